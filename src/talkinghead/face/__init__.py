"""Face landmarks: the mediapipe face-mesh wrapper and the landmark index sets every stage shares."""

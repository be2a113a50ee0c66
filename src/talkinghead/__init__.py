"""talkinghead: monocular video -> 3D talking avatar.

Pipeline (one command per stage): prepare -> train -> render -> eval.
Imports here stay cheap: heavy optional dependencies (mediapipe, pocketsphinx,
transformers) are imported inside the functions that need them.
"""

__version__ = "0.1.0"

"""Audio for every stage: per-video-frame features (prepare, render) and the checks on input audio.

Public API::

    compute_audio_features(wave, fps, num_frames, *, progress=False, wav2vec_model=None) -> AudioFeatures
    AudioFeatures.stack() -> float32 [T, D]; .names; .save(path); AudioFeatures.load(path)
    check_audio(wave, source) -> None          # UserError on empty / silent audio
    load_driving_audio(path) -> float32 [S]    # read_audio at 16 kHz + check_audio

Heavy dependencies (pocketsphinx, transformers, torch) are imported only when features are computed.
"""

from talkinghead.audio.features import AudioFeatures, check_audio, compute_audio_features, load_driving_audio

__all__ = ["AudioFeatures", "check_audio", "compute_audio_features", "load_driving_audio"]

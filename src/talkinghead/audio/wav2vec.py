"""Optional wav2vec 2.0 / HuBERT features from a *local* transformers model folder.

Talk3D (Sec. 3, footnote: "a pre-trained Wav2Vec model"), FlameTalk (Sec. 3.1, frozen wav2vec 2.0 encoder)
and the one-shot emotion paper (Sec. III-A, audio encoder = wav2vec 2.0) condition on these features. The
weights are not shipped and cannot be downloaded offline, so this is opt-in: point ``--wav2vec`` at a folder
saved with ``save_pretrained`` (``config.json`` + weights, optionally ``preprocessor_config.json``).

The encoder's last hidden state comes at 50 Hz (20 ms stride, 25 ms receptive field, row ``n`` centred at
``n * 0.02 + 0.0125`` s); it is linearly interpolated to the video frame instants ``i / fps`` as those papers
resample wav2vec features to their video rate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from talkinghead.errors import UserError

STRIDE_S = 0.02  # 320 samples at 16 kHz: the product of the conv feature encoder's strides
OFFSET_S = 0.0125  # centre of the first 400-sample receptive field


@dataclass
class Wav2VecEncoder:
    model: object  # a transformers audio encoder in eval mode
    normalize: bool  # zero-mean unit-variance input, as its feature extractor's ``do_normalize``


def load_wav2vec(path: str | os.PathLike) -> Wav2VecEncoder:
    """A wav2vec 2.0 / HuBERT encoder from a local folder; :class:`UserError` when missing or invalid."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"wav2vec model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a transformers model folder (no config.json)")
    try:
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError("wav2vec features need transformers: pip install transformers") from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in ("wav2vec2", "hubert", "wavlm", "data2vec-audio"):
            raise UserError(f"{path}: model type {config.model_type!r} is not a wav2vec 2.0 / HuBERT encoder")
        hf_logging.disable_progress_bar()  # a bar per weight file in the middle of ours
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except UserError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError on broken folders
        raise UserError(f"{path}: cannot load the wav2vec model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Wav2VecEncoder(model.eval(), _do_normalize(path))


def _do_normalize(path: Path) -> bool:
    """Whether the model expects zero-mean unit-variance input (its feature extractor's ``do_normalize``)."""
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        try:
            return bool(json.loads(pre.read_text()).get("do_normalize", True))
        except (OSError, ValueError):
            raise UserError(f"{pre}: unreadable preprocessor config") from None
    return True


def wav2vec_features(encoder: Wav2VecEncoder, wave: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """Last hidden state of ``encoder`` on ``wave`` (float32 [S], 16 kHz) at the video frames: float32 [T, D]."""
    import torch

    x = np.asarray(wave, np.float32).reshape(-1)
    min_len = 400  # one receptive field
    if len(x) < min_len:
        x = np.pad(x, (0, min_len - len(x)))
    if encoder.normalize:
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    with torch.inference_mode():
        hidden = encoder.model(torch.from_numpy(x)[None]).last_hidden_state[0].float().numpy()  # [N, D]
    # Linear interpolation from the 50 Hz rows to the frame instants, holding the ends.
    pos = np.clip((np.arange(num_frames) / fps - OFFSET_S) / STRIDE_S, 0.0, len(hidden) - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, len(hidden) - 1)
    w = (pos - i0)[:, None].astype(np.float32)
    return (hidden[i0] * (1.0 - w) + hidden[i1] * w).astype(np.float32)

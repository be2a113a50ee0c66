"""SyncNet confidence (Chung & Zisserman 2016, "Out of time"), the papers' "Sync" column, from local weights.

Our own implementation of the published two-tower network and evaluation protocol:

* audio tower: 13 MFCCs x 20 steps (0.2 s at 100 Hz) -> 2-D conv stack (64, 192, 384, 256, 256, 512 channels,
  BatchNorm + ReLU, pools after conv2 and conv5, a final 5x4 conv) -> FC 512 -> FC 1024;
* visual tower: 5 consecutive 224 x 224 RGB face crops (0.2 s at 25 fps) -> 3-D conv (96 ch, 5x7x7) then
  2-D-in-time convs (256, 256, 256, 256, 512) -> FC 512 -> FC 1024;
* evaluation: embeddings for every 5-frame window, Euclidean distance between the video window at t and the
  audio windows at t + k for k in [-15, 15]; mean over t; offset = argmin (positive = audio late),
  confidence = median - minimum of the mean distances.
* MFCC as the reference evaluation computes it: 25 ms rectangular frames every 10 ms, pre-emphasis 0.97,
  512-point power spectrum, 26 mel filters, log, orthonormal DCT-II keeping 13, cepstral lifter 22, c0
  replaced by the log frame energy.

Deviation: the reference pipeline crops faces with the S3FD detector; we crop from the mediapipe mesh's
bounding box with the reference's margins (0.4 of the box half-size, extended towards the chin).

Weights: the standard ``syncnet_v2.model`` state dict (keys ``netcnnaud.*``, ``netfcaud.*``, ``netcnnlip.*``,
``netfclip.*``; a ``__S__.`` or ``module.`` prefix is stripped), from ``--syncnet-weights`` or
``$TALKINGHEAD_SYNCNET_WEIGHTS``. Without them the Sync confidence is ``null`` with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from talkinghead.errors import UserError

SYNCNET_ENV = "TALKINGHEAD_SYNCNET_WEIGHTS"
CROP = 224
WINDOW = 5  # video frames per embedding
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps video


def _bn_relu_2d(cin: int, cout: int, k, **kw) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout), nn.ReLU()]


def _bn_relu_3d(cin: int, cout: int, k, **kw) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, k, **kw), nn.BatchNorm3d(cout), nn.ReLU()]


def _fc(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNet(nn.Module):
    """Audio and visual towers. ``embed_audio(mfcc [B, 1, 13, 20])``, ``embed_video(crops [B, 3, 5, 224, 224])``."""

    def __init__(self, dim: int = 1024) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_bn_relu_2d(1, 64, 3, padding=1), nn.MaxPool2d(1, 1),
            *_bn_relu_2d(64, 192, 3, padding=1), nn.MaxPool2d(3, (1, 2)),
            *_bn_relu_2d(192, 384, 3, padding=1),
            *_bn_relu_2d(384, 256, 3, padding=1),
            *_bn_relu_2d(256, 256, 3, padding=1), nn.MaxPool2d(3, 2),
            *_bn_relu_2d(256, 512, (5, 4)),
        )
        self.netfcaud = _fc(dim)
        self.netcnnlip = nn.Sequential(
            *_bn_relu_3d(3, 96, (5, 7, 7), stride=(1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_bn_relu_3d(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            *_bn_relu_3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *_bn_relu_3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *_bn_relu_3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_bn_relu_3d(256, 512, (1, 6, 6)),
        )
        self.netfclip = _fc(dim)
        self.eval()

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_video(self, crops: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(crops).flatten(1))


def find_weights(path: str | os.PathLike | None = None) -> Path | str:
    """The SyncNet weight file, or the reason there is none (a sentence)."""
    path = path or os.environ.get(SYNCNET_ENV)
    if not path:
        return f"SyncNet weights not given (syncnet_v2.model via --syncnet-weights or ${SYNCNET_ENV})"
    if not Path(path).is_file():
        return f"SyncNet weights not found: {path}"
    return Path(path)


def load_syncnet(path: str | os.PathLike) -> SyncNet:
    """A SyncNet with weights from a local state-dict file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read SyncNet weights {path} ({type(exc).__name__})") from None
    state = {k.removeprefix("__S__.").removeprefix("module."): v for k, v in dict(state).items()}
    model = SyncNet()
    mine = model.state_dict()
    missing = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if missing:
        raise UserError(f"{path}: not SyncNet weights ({len(missing)} tensors missing or mis-shaped, "
                        f"e.g. {missing[0]})")
    model.load_state_dict({k: state[k] for k in mine})
    return model.eval()


def mfcc(wave: np.ndarray, rate: int = 16000) -> np.ndarray:
    """MFCC [N, 13] at 100 Hz of mono ``wave`` [S], computed as the SyncNet evaluation does (module doc)."""
    win, step, nfft, nfilt, ncep, lifter = int(0.025 * rate), int(0.01 * rate), 512, 26, 13, 22
    x = np.append(wave[:1], wave[1:] - 0.97 * wave[:-1]).astype(np.float64)
    n = 1 + int(np.ceil(max(len(x) - win, 0) / step))
    x = np.pad(x, (0, (n - 1) * step + win - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::step][:n]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft  # [N, 257]
    energy = np.maximum(power.sum(1), np.finfo(float).eps)
    mel = np.linspace(0.0, 2595 * np.log10(1 + (rate / 2) / 700), nfilt + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595) - 1)) / rate).astype(int)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        fb[j, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
        fb[j, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
    feat = np.log(np.maximum(power @ fb.T, np.finfo(float).eps))
    from scipy.fft import dct

    cep = dct(feat, type=2, axis=1, norm="ortho")[:, :ncep]
    cep *= 1 + (lifter / 2) * np.sin(np.pi * np.arange(ncep) / lifter)
    cep[:, 0] = np.log(energy)
    return cep.astype(np.float32)


def face_crop(image: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """uint8 [224, 224, 3] crop around the face of ``lm`` [478, 3], with the reference pipeline's margins."""
    import cv2

    lo, hi = lm[:, :2].min(0), lm[:, :2].max(0)
    cx, cy = (lo + hi) / 2
    s = float((hi - lo).max()) / 2
    margin = 0.4
    pad = int(np.ceil(s * (1 + 2 * margin))) + 1
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=110)
    y0, y1 = int(cy - s) + pad, int(cy + s * (1 + 2 * margin)) + pad
    x0, x1 = int(cx - s * (1 + margin)) + pad, int(cx + s * (1 + margin)) + pad
    return cv2.resize(padded[y0:y1, x0:x1], (CROP, CROP))


@torch.no_grad()
def syncnet_offset(model: SyncNet, crops: np.ndarray, wave: np.ndarray, max_offset: int = 15,
                   batch: int = 20) -> tuple[int, float]:
    """(offset, confidence) of face crops uint8 [T, 224, 224, 3] (RGB, 25 fps) against 16 kHz audio [S]."""
    coeffs = torch.from_numpy(mfcc(wave)).T[None, None]  # [1, 1, 13, N]
    n = min(len(crops) - WINDOW + 1, (coeffs.shape[-1] - 20) // MFCC_PER_FRAME + 1)
    if n < 1:
        raise ValueError("SyncNet needs at least 5 frames and 0.2 s of audio")
    # The reference model was trained on BGR crops in 0..255.
    video = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(3, 0, 1, 2).float()[None]
    vf, af = [], []
    for i in range(0, n, batch):
        idx = range(i, min(i + batch, n))
        vf.append(model.embed_video(torch.cat([video[:, :, j:j + WINDOW] for j in idx])))
        af.append(model.embed_audio(torch.cat([coeffs[..., j * MFCC_PER_FRAME:j * MFCC_PER_FRAME + 20]
                                               for j in idx])))
    v, a = torch.cat(vf), torch.cat(af)
    a_pad = torch.nn.functional.pad(a, (0, 0, max_offset, max_offset))
    dists = torch.stack([torch.linalg.vector_norm(v - a_pad[k:k + n], dim=1) for k in range(2 * max_offset + 1)])
    mean = dists.mean(1)  # [2K+1], index k <-> audio window t + k - max_offset
    best = int(torch.argmin(mean))
    return best - max_offset, float(mean.median() - mean[best])

"""LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep features"), AlexNet variant v0.1.

Our own small implementation of the published architecture (torchvision cannot be installed here):

* backbone: AlexNet ``features`` (Krizhevsky 2014 "one weird trick" layout used by torchvision), the
  five ReLU outputs after conv1..conv5 taken as feature maps (64, 192, 384, 256, 256 channels);
* input scaling: images in [-1, 1], shifted and scaled per channel by the LPIPS ScalingLayer constants;
* per layer: unit-normalise features along channels, squared difference, a learned non-negative 1x1
  linear head ("lin" layers, no bias), spatial mean; the distance is the sum over the five layers (eq. 1
  of the paper).

Weights are never downloaded. They load from local files with the standard names: the linear heads from
the ``lpips`` package's ``alex.pth`` (keys ``lin{k}.model.1.weight``) and the backbone from torchvision's
``alexnet-owt-*.pth`` (keys ``features.{i}.weight/bias``), looked up in an explicit folder, then
``$TALKINGHEAD_LPIPS_WEIGHTS``, then the torch hub cache ``~/.cache/torch/hub/checkpoints/``. Without
both files LPIPS is reported as ``null`` with the reason; no number is ever made up.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from talkinghead.errors import UserError

LPIPS_ENV = "TALKINGHEAD_LPIPS_WEIGHTS"
_CHANNELS = (64, 192, 384, 256, 256)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Indices of the conv layers inside torchvision's ``alexnet.features`` Sequential (weights' key names).
_CONV_INDEX = (0, 3, 6, 8, 10)


class AlexNetFeatures(nn.Module):
    """AlexNet convolutional trunk; ``forward`` returns the five post-ReLU maps [B, C_k, H_k, W_k]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i - 1 in _CONV_INDEX:  # the ReLU right after each conv
                outs.append(x)
        return outs


class LPIPS(nn.Module):
    """LPIPS distance. ``forward(a, b)`` with images [B, 3, H, W] in [-1, 1] returns [B]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexNetFeatures()
        # Dropout before each 1x1 conv mirrors the published layout (and its key names); inactive in eval.
        self.lins = nn.ModuleList(
            nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False)) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self.net((a - self.shift) / self.scale)
        fb = self.net((b - self.shift) / self.scale)
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for lin, xa, xb in zip(self.lins, fa, fb):
            xa = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            xb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((xa - xb) ** 2).mean(dim=(1, 2, 3))
        return total

    def load_weights(self, backbone: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> None:
        """Copy torchvision AlexNet ``features.*`` tensors and lpips ``lin{k}.model.1.weight`` tensors."""
        mine = self.state_dict()
        for i in _CONV_INDEX:
            for kind in ("weight", "bias"):
                key = f"features.{i}.{kind}"
                if key not in backbone or backbone[key].shape != mine[f"net.{key}"].shape:
                    raise UserError(f"LPIPS backbone weights lack a matching {key}: not torchvision's AlexNet")
                mine[f"net.{key}"] = backbone[key]
        for k in range(len(_CHANNELS)):
            key = f"lin{k}.model.1.weight"
            if key not in heads or heads[key].shape != mine[f"lins.{k}.1.weight"].shape:
                raise UserError(f"LPIPS head weights lack a matching {key}: not the lpips package's alex.pth")
            mine[f"lins.{k}.1.weight"] = heads[key]
        self.load_state_dict(mine)


def find_weights(folder: str | os.PathLike | None = None) -> tuple[Path, Path] | str:
    """(backbone, heads) weight paths, or the reason they cannot be found (a sentence)."""
    candidates = [Path(folder)] if folder else []
    if os.environ.get(LPIPS_ENV):
        candidates.append(Path(os.environ[LPIPS_ENV]))
    candidates.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    for d in candidates:
        heads = d / "alex.pth"
        backbones = sorted(d.glob("alexnet-owt-*.pth")) if d.is_dir() else []
        if heads.is_file() and backbones:
            return backbones[0], heads
    where = ", ".join(str(d) for d in candidates)
    return (f"LPIPS weights not found locally (need alex.pth and alexnet-owt-*.pth in one of: {where}; "
            f"set --lpips-weights or ${LPIPS_ENV})")


def load_lpips(backbone: Path, heads: Path) -> LPIPS:
    """An LPIPS module with weights from local files (see :func:`find_weights`)."""
    model = LPIPS()
    try:
        bb = torch.load(backbone, map_location="cpu", weights_only=True)
        hd = torch.load(heads, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read LPIPS weights {backbone} / {heads} ({type(exc).__name__})") from None
    model.load_weights(bb, hd)
    return model


def to_lpips_input(image) -> torch.Tensor:
    """uint8 [H, W, 3] numpy image -> [1, 3, H, W] float in [-1, 1]."""
    t = torch.as_tensor(image).permute(2, 0, 1)[None].float()
    return t / 127.5 - 1.0

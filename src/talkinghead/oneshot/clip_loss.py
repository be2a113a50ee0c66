"""The emotion mapper's CLIP and histogram losses (paper 003 sec. III-C3, eq. 3), CLIP from a local folder.

``L_CLIP``: one minus the cosine similarity, in CLIP's joint space, between the emotion-manipulated render
I^e and a text prompt describing the emotion. ``L_sim``: the histogram loss of NeRFFaceEditing, keeping the
colour distribution of I^e close to that of the original render I^origin (differentiable soft histograms).

CLIP weights are not shipped and cannot be downloaded here: :func:`load_clip` reads a local Hugging Face
folder (``CLIPModel.save_pretrained`` layout: config.json + weights) and nothing else. Without one, the
mapper is trained from emotion-labelled clips instead (:mod:`.mead`), or not at all, and the default emotion
control is the FACS offsets of :mod:`.emotion`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from talkinghead.errors import UserError

# Detailed prompts, as the paper's ablation (Fig. 6) found they beat "realistic face with sad emotion".
PROMPTS: dict[str, str] = {
    "angry": "a photo of a furious face with lowered, drawn-together brows, glaring eyes and pressed lips",
    "contempt": "a photo of a contemptuous face with one mouth corner raised in a sneer",
    "disgusted": "a photo of a disgusted face with a wrinkled nose and a raised upper lip",
    "fear": "a photo of a frightened face with raised brows, wide open eyes and a stretched mouth",
    "happy": "a photo of a happy smiling face with raised cheeks and upturned mouth corners",
    "sad": "a photo of a sad face with raised inner brows, down-turned mouth corners and teary eyes",
    "surprised": "a photo of a surprised face with raised brows, wide open eyes and a dropped jaw",
    "neutral": "a photo of a calm face with a neutral expression",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _embedding(out) -> Tensor:
    """CLIP's projected embedding: a tensor (transformers 4) or the output's ``pooler_output`` (transformers 5)."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipLoss:
    """L_CLIP on images [B, 3, H, W] in [0, 1] against the prompt of each image's label."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._text: dict[str, Tensor] = {}

    def text_embedding(self, label: str) -> Tensor:
        if label not in self._text:
            tok = self.tokenizer([PROMPTS[label]], padding=True, return_tensors="pt")
            with torch.no_grad():
                self._text[label] = F.normalize(_embedding(self.model.get_text_features(**tok)), dim=-1)[0]
        return self._text[label]

    def __call__(self, images: Tensor, labels: list[str]) -> Tensor:
        size = self.model.config.vision_config.image_size
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        mean = x.new_tensor(CLIP_MEAN)[:, None, None]
        std = x.new_tensor(CLIP_STD)[:, None, None]
        img = F.normalize(_embedding(self.model.get_image_features(pixel_values=(x - mean) / std)), dim=-1)
        txt = torch.stack([self.text_embedding(label) for label in labels]).to(img)
        return (1.0 - (img * txt).sum(-1)).mean()


def load_clip(folder: str | Path) -> ClipLoss:
    """A :class:`ClipLoss` from a local CLIP folder (``CLIPModel.save_pretrained`` + its tokenizer)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a local CLIP model folder (no config.json)")
    try:
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError:
        raise UserError("the CLIP loss needs transformers: pip install transformers") from None
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load CLIP from {folder}: {exc}".splitlines()[0]) from None
    return ClipLoss(model, tokenizer)


def soft_histogram(images: Tensor, bins: int = 32, bandwidth: float = 0.02) -> Tensor:
    """Differentiable per-channel histograms [B, 3, bins] (sum 1) of images [B, 3, H, W] in [0, 1]."""
    centres = torch.linspace(0, 1, bins, device=images.device, dtype=images.dtype)
    x = images.flatten(2)[..., None]  # [B, 3, N, 1]
    w = torch.exp(-0.5 * ((x - centres) / bandwidth) ** 2)
    h = w.sum(2)
    return h / h.sum(-1, keepdim=True).clamp(min=1e-8)


def histogram_loss(a: Tensor, b: Tensor) -> Tensor:
    """L_sim: L1 distance between the colour histograms of two image batches [B, 3, H, W]."""
    return (soft_histogram(a) - soft_histogram(b)).abs().sum(-1).mean()

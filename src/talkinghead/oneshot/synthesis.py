"""Triplane synthesis G(w_id, z_m) and its rendering R (paper 003 sec. III-B, Fig. 2).

* :class:`TriplaneSynthesis` G: PV3D's backbone is a StyleGAN2 synthesis network whose output is reshaped into
  three feature planes. Ours is the same kind of network, small: a learned 4x4 constant, modulated 3x3
  convolutions with weight demodulation (StyleGAN2) doubling the size per block up to the plane side, and a
  last modulated 1x1 layer to 3 x C channels. Each layer's style is an affine map of the concatenation
  [w_level, z_m]: the coarse, mid and fine parts of w_id steer the first, middle and last layers (as
  pSp/PV3D's per-layer w+), and the motion code z_m enters every layer (PV3D feeds its motion code to the
  synthesis the same way). Deviation: no PV3D pre-training (no weights offline); it learns from scratch on
  the training clips.
* :class:`PortraitRenderer` R: the triplanes go through the shared triplane volume renderer and
  super-resolution of :mod:`talkinghead.render.volume` / :mod:`talkinghead.render.superres` (EG3D's, built
  for Talk3D; 48 + 48 samples in the gpu preset). Deviation: EG3D/PV3D render the whole crop from the
  volume; we render the head only and composite it over a backdrop (background + torso, head removed) of
  the reference frame, as every other method of the project does, so turning the head (``--yaw``) does not
  drag the background with it. The super-resolution upsamples premultiplied RGB + alpha (its skip path) with
  the other features, and the backdrop is composited at the output size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .identity import LEVELS


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution with demodulation: x [B, Cin, h, w], style [B, S] -> [B, Cout, h, w]."""

    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / math.sqrt(cin * kernel * kernel))
        self.affine = nn.Linear(style_dim, cin)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the plain convolution
        self.bias = nn.Parameter(torch.zeros(cout))
        self.demodulate = demodulate
        self.padding = kernel // 2

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        B, cin, h, w = x.shape
        s = self.affine(style)  # [B, Cin]
        wgt = self.weight[None] * s[:, None, :, None, None]  # [B, Cout, Cin, k, k]
        if self.demodulate:
            wgt = wgt * torch.rsqrt(wgt.pow(2).sum((2, 3, 4), keepdim=True) + 1e-8)
        out = F.conv2d(x.reshape(1, B * cin, h, w), wgt.reshape(-1, cin, *wgt.shape[3:]), padding=self.padding,
                       groups=B)
        return out.view(B, -1, h, w) + self.bias[None, :, None, None]


class TriplaneSynthesis(nn.Module):
    """G: w [B, 3, W] (+ z_m [B, Z]) -> triplanes [B, 3, C, R, R]."""

    def __init__(self, code_dim: int, motion_dim: int, plane_size: int, plane_channels: int, channels: int):
        super().__init__()
        self.plane_channels = plane_channels
        self.const = nn.Parameter(torch.randn(channels, 4, 4))
        blocks = int(round(math.log2(plane_size / 4)))
        if 4 * 2 ** blocks != plane_size:
            raise ValueError(f"plane_size must be 4 * 2^n, got {plane_size}")
        style = code_dim + motion_dim
        self.convs = nn.ModuleList([ModulatedConv(channels, channels, 3, style)])
        for _ in range(blocks):
            self.convs.append(ModulatedConv(channels, channels, 3, style))
            self.convs.append(ModulatedConv(channels, channels, 3, style))
        self.to_planes = ModulatedConv(channels, 3 * plane_channels, 1, style, demodulate=False)
        n = len(self.convs) + 1
        # layer -> pyramid level: coarse for the first third, mid, fine for the last layers
        self.level_of = [min(LEVELS - 1, k * LEVELS // n) for k in range(n)]

    def forward(self, w: Tensor, z: Tensor) -> Tensor:
        B = w.shape[0]
        x = self.const[None].expand(B, -1, -1, -1)
        for k, conv in enumerate(self.convs):
            if k > 0 and k % 2 == 1:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.leaky_relu(conv(x, torch.cat([w[:, self.level_of[k]], z], -1)), 0.2)
        planes = self.to_planes(x, torch.cat([w[:, self.level_of[-1]], z], -1))
        R = planes.shape[-1]
        return planes.view(B, 3, self.plane_channels, R, R)


class PortraitRenderer(nn.Module):
    """R: triplanes [3, C, R, R], camera and backdrop -> the image (module docstring).

    ``render`` returns ``image`` [3, S, S] (composited over the backdrop), ``lowres`` [3, s, s] (the raw neural
    render over the backdrop at the render size), ``alpha`` [s, s]."""

    def __init__(self, plane_channels: int, feature_channels: int, render_size: int, image_size: int,
                 superres_channels: tuple[int, ...], box: tuple[float, ...], num_coarse: int, num_fine: int):
        super().__init__()
        from talkinghead.render.superres import SuperResolution
        from talkinghead.render.volume import OSGDecoder, VolumeConfig

        self.decoder = OSGDecoder(in_channels=plane_channels, hidden=64, out_channels=feature_channels)
        self.superres = SuperResolution(in_channels=feature_channels + 1, out_channels=4,
                                        channels=tuple(superres_channels))
        if render_size * self.superres.factor != image_size:
            raise ValueError(f"render_size {render_size} x {self.superres.factor} != image_size {image_size}")
        self.render_size, self.image_size = render_size, image_size
        self.volume = VolumeConfig(num_coarse=num_coarse, num_fine=num_fine, chunk=65536)
        self.register_buffer("box", torch.tensor(box, dtype=torch.float32).view(2, 3))

    def render(self, planes: Tensor, viewmat: Tensor, K: Tensor, backdrop: Tensor, perturb: bool = False,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """planes [3, C, R, R]; viewmat [4, 4]; K [3, 3] at ``image_size``; backdrop [3, S, S] in [0, 1]."""
        from talkinghead.render.volume import render_triplane

        s = self.render_size
        K_low = K.clone()
        K_low[:2] = K[:2] * (s / self.image_size)  # pixel centres at +0.5 make this exact
        out = render_triplane(planes, self.decoder, self.box, viewmat, K_low, s, s, self.volume, perturb=perturb,
                              generator=generator)
        feats, alpha = out["features"], out["alpha"]  # [s, s, F], [s, s]
        x = torch.cat([feats[..., :3], alpha[..., None], feats[..., 3:]], -1).permute(2, 0, 1)[None]
        hi = self.superres(x)[0]  # [4, S, S]: premultiplied RGB, alpha
        a_hi = hi[3:4].clamp(0, 1)
        image = hi[:3] + (1 - a_hi) * backdrop
        back_low = F.interpolate(backdrop[None], size=(s, s), mode="area")[0]
        lowres = feats[..., :3].permute(2, 0, 1) + (1 - alpha[None]) * back_low
        return {"image": image, "lowres": lowres, "alpha": alpha}

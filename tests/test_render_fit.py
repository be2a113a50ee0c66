"""Tiny fit: a few hundred Gaussians learn a real photo by gradient descent through the CPU rasterizer."""

from __future__ import annotations

import math

import torch

from conftest import shared_clip
from talkinghead.render import GaussianModel

SIZE, GRID, STEPS = 64, 20, 150  # 400 Gaussians; ~3 s of CPU time (measured, not asserted)
PSNR_MIN = 30.0  # measured 33.2 dB (torch 2.13 CPU); the uniform grey start is 12.9 dB


def first_frame(path, size: int) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    img = torch.from_numpy(frame).float().div(255).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(img, size=(size, size), mode="area")[0].permute(1, 2, 0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(((a.clamp(0, 1) - b) ** 2).mean().item())


def test_gaussians_fit_a_real_frame(one_torch_thread):
    torch.manual_seed(0)
    target = first_frame(shared_clip("may_en_5s.mp4"), SIZE)
    # A grid of grey Gaussians on the plane z = 1, which the camera (f = SIZE) sees edge to edge.
    xs = (torch.arange(GRID) + 0.5) / GRID - 0.5
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    points = torch.cat([grid, torch.ones(GRID * GRID, 1)], 1)
    model = GaussianModel.from_points(points, sh_degree=0, opacity=0.5, scales=torch.full((GRID * GRID,), 1 / GRID))
    K = torch.tensor([[SIZE, 0, SIZE / 2], [0, SIZE, SIZE / 2], [0, 0, 1.0]])
    viewmat = torch.eye(4)
    opt = torch.optim.Adam(
        [
            {"params": [model.means], "lr": 2e-3},
            {"params": [model.log_scales, model.quats], "lr": 2e-2},
            {"params": [model.logit_opacities, model.sh0], "lr": 5e-2},
        ]
    )
    start = psnr(model.render(viewmat, K, SIZE, SIZE, backend="torch")[0].detach(), target)
    for _ in range(STEPS):
        image, *_ = model.render(viewmat, K, SIZE, SIZE, backend="torch")
        loss = (image - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = psnr(model.render(viewmat, K, SIZE, SIZE, backend="torch")[0].detach(), target)
    assert start < 15 and final > PSNR_MIN, (start, final)

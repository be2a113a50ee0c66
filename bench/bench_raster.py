"""Benchmark of the rasterizer: forward and forward+backward ms at 128^2, 256^2, 512^2 with 5k/20k/50k Gaussians.

Not a test. The scene stands in for a trained head avatar: Gaussians spread over a 10 cm sphere (a head)
seen from 0.8 m by a talking-head camera (focal 1200 px at 512^2, scaled with the resolution), sized so
that neighbours overlap (scale ~ spacing / 2), flattened along one random axis, random opacities in
[0.2, 1], RGB colours (``--sh 3`` for degree-3 SH instead). The same scene is used for every
resolution, so pixels per Gaussian grow 4x per doubling of the side, as in a real render.

    .venv/bin/python bench/bench_raster.py [--sizes 128 256 512] [--counts 5000 20000 50000] [--backends torch gsplat]
                                           [--sh 3] [--threads 2] [--repeats 5] [--torch-device cuda]

On a CUDA machine with gsplat, ``--backends torch gsplat --torch-device cuda`` times both backends on the GPU.

Times are the best of ``--repeats`` runs after one warm-up: wall-clock, and for forward+backward also the
process CPU time summed over threads. Other load on a shared machine inflates wall times, and with more
than one thread OpenMP's waiting inflates both; with ``--threads 1`` the CPU time is close to what an idle
machine's wall clock shows. Note the load (``uptime``) beside any figure you record.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from talkinghead.render import gsplat_available, rasterize


def head_scene(n: int, size: int, device: str = "cpu", sh_degree: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    radius, distance = 0.1, 0.8
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = dirs * radius * (1 + 0.05 * torch.randn(n, 1, generator=g))
    spacing = math.sqrt(4 * math.pi * radius**2 / n)
    scales = 0.5 * spacing * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    scales[:, 2] *= 0.2
    quats = torch.randn(n, 4, generator=g)
    opacities = 0.2 + 0.8 * torch.rand(n, generator=g)
    if sh_degree is None:
        colors = torch.rand(n, 3, generator=g)
    else:
        colors = 0.3 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g)
    viewmat = torch.eye(4)
    viewmat[2, 3] = distance
    f = 1200.0 * size / 512
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    tensors = [means, quats, scales, opacities, colors, viewmat, K]
    return [t.to(device) for t in tensors]


def time_ms(fn, repeats: int, sync) -> tuple[float, float]:
    """Best wall-clock ms and best CPU ms (process time, summed over threads) of ``repeats`` runs."""
    fn()  # warm-up
    sync()
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall = min(wall, (time.perf_counter() - t0) * 1000)
        cpu = min(cpu, (time.process_time() - c0) * 1000)
    return wall, cpu


def bench(size: int, n: int, backend: str, sh_degree: int | None, repeats: int, torch_device: str = "cpu"):
    device = "cuda" if backend == "gsplat" else torch_device
    means, quats, scales, opacities, colors, viewmat, K = head_scene(n, size, device, sh_degree)
    params = [t.requires_grad_() for t in (means, quats, scales, opacities, colors)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            rasterize(*params, viewmat, K, size, size, sh_degree=sh_degree, backend=backend)

    def forward_backward():
        image, alpha, depth, _ = rasterize(*params, viewmat, K, size, size, sh_degree=sh_degree, backend=backend)
        (image.sum() + alpha.sum()).backward()

    return time_ms(forward, repeats, sync), time_ms(forward_backward, repeats, sync)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--counts", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--backends", nargs="+", default=["torch", "gsplat"] if gsplat_available() else ["torch"])
    ap.add_argument("--sh", type=int, default=None, help="SH degree (default: plain RGB colours)")
    ap.add_argument("--repeats", type=int, default=5, help="timings are the best of this many runs")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--torch-device", default="cpu", help="device of the torch backend (gsplat is always cuda)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    print("| backend | size | gaussians | forward ms | forward+backward ms | fwd+bwd CPU ms | fps (forward) |")
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for size in args.sizes:
            for n in args.counts:
                (fwd, _), (fwd_bwd, cpu) = bench(size, n, backend, args.sh, args.repeats, args.torch_device)
                name = f"{backend} ({args.torch_device})" if backend == "torch" else backend
                row = f"| {name} | {size}^2 | {n} | {fwd:.1f} | {fwd_bwd:.1f} | {cpu:.1f} | {1000 / fwd:.0f} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()

"""Learnable 3D Gaussians: parameter layout, activations, checkpoints (safetensors) and 3DGS ``.ply`` export.

The raw parameters are what optimisers see; the activated values are what :func:`rasterize` takes:

====================  ============  ======================================
parameter             shape         activation
====================  ============  ======================================
``means``             [N, 3]        none (world / head frame)
``log_scales``        [N, 3]        ``exp`` -> linear scales
``quats``             [N, 4]        none (w, x, y, z); the rasterizer normalises
``logit_opacities``   [N]           ``sigmoid`` -> opacity in (0, 1)
``sh0``               [N, 1, 3]     SH DC term; colour = ``C0 * sh0 + 0.5``
``shN``               [N, K-1, 3]   higher SH bands, K = (sh_degree + 1)^2
====================  ============  ======================================

A model may also hold *extra* per-Gaussian parameters (``extras={"embedding": [N, d]}``, e.g. DEGSTalk's
learnable per-Gaussian embedding): they are rows of the same Gaussians, so density control copies them when a
Gaussian is cloned or split and drops them when it is pruned (``param_names`` lists all), and ``save`` /
``load`` keep them. The rasterizer never sees them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .rasterize import Backend, rasterize
from .sh import num_sh_bases, rgb_to_sh

PARAM_NAMES = ("means", "log_scales", "quats", "logit_opacities", "sh0", "shN")
CHECKPOINT_FORMAT = "talkinghead.gaussians/1"


class GaussianModel(torch.nn.Module):
    """A set of 3D Gaussians with SH colours up to ``sh_degree``; see the module docstring for the layout."""

    def __init__(
        self, means: Tensor, log_scales: Tensor, quats: Tensor, logit_opacities: Tensor, sh0: Tensor, shN: Tensor,
        extras: dict[str, Tensor] | None = None,  # name -> [N, ...] extra per-Gaussian parameters
    ):
        super().__init__()
        n = means.shape[0]
        k = shN.shape[1] + 1
        self.sh_degree = round(math.sqrt(k)) - 1
        if num_sh_bases(self.sh_degree) != k or self.sh_degree > 3:
            raise ValueError(f"shN must hold (d + 1)^2 - 1 coefficients for a degree d <= 3, got {k - 1}")
        for name, t, shape in (
            ("means", means, (n, 3)), ("log_scales", log_scales, (n, 3)), ("quats", quats, (n, 4)),
            ("logit_opacities", logit_opacities, (n,)), ("sh0", sh0, (n, 1, 3)), ("shN", shN, (n, k - 1, 3)),
        ):  # fmt: skip
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
            self.register_parameter(name, torch.nn.Parameter(t.detach().clone().float().contiguous()))
        for name, t in (extras or {}).items():
            if name in PARAM_NAMES or t.shape[0] != n:
                raise ValueError(f"extra parameter {name!r} must be a new name with {n} rows, got {list(t.shape)}")
            self.register_parameter(name, torch.nn.Parameter(t.detach().clone().float().contiguous()))
        self.extra_names = tuple(extras or ())

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every per-Gaussian parameter: the 3DGS ones (PARAM_NAMES), then the extras."""
        return PARAM_NAMES + self.extra_names

    @classmethod
    def from_points(
        cls,
        points: Tensor,  # [N, 3]
        colors: Tensor | None = None,  # [N, 3] RGB in [0, 1]
        sh_degree: int = 3,
        opacity: float = 0.1,
        scales: Tensor | None = None,  # [N] or [N, 3] linear; default: RMS distance to the 3 nearest points
    ) -> "GaussianModel":
        """Initial Gaussians on a point cloud, as 3DGS does: isotropic, identity rotation, low opacity."""
        n, device = points.shape[0], points.device
        if scales is None:
            scales = _neighbour_distance(points)
        scales = scales.to(device, torch.float32).reshape(n, -1).expand(n, 3)
        if colors is None:
            colors = torch.full((n, 3), 0.5, device=device)
        quats = torch.zeros(n, 4, device=device)
        quats[:, 0] = 1.0
        return cls(
            means=points.float(),
            log_scales=torch.log(scales),
            quats=quats,
            logit_opacities=torch.logit(torch.full((n,), opacity, device=device)),
            sh0=rgb_to_sh(colors.float())[:, None, :],
            shN=torch.zeros(n, num_sh_bases(sh_degree) - 1, 3, device=device),
        )

    def __len__(self) -> int:
        return self.means.shape[0]

    def extra_repr(self) -> str:
        return f"{len(self)} Gaussians, SH degree {self.sh_degree}"

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.logit_opacities)

    @property
    def sh(self) -> Tensor:
        """[N, K, 3] all SH coefficients."""
        return torch.cat([self.sh0, self.shN], 1)

    def render(
        self,
        viewmat: Tensor,  # [4, 4] or [C, 4, 4]
        K: Tensor,  # [3, 3] or [C, 3, 3]
        width: int,
        height: int,
        background: Tensor | None = None,
        sh_degree: int | None = None,
        backend: Backend = "auto",
    ):
        """:func:`rasterize` with the activated parameters; ``sh_degree`` (default: all) allows 3DGS's
        progressive SH schedule."""
        degree = self.sh_degree if sh_degree is None else min(sh_degree, self.sh_degree)
        return rasterize(
            self.means, self.quats, self.scales, self.opacities, self.sh[:, : num_sh_bases(degree)],
            viewmat, K, width, height, background=background, sh_degree=degree, backend=backend,
        )  # fmt: skip

    # -- persistence -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Checkpoint as safetensors (no pickle): the raw parameters plus the SH degree in the metadata."""
        from safetensors.torch import save_file

        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self.param_names}
        save_file(tensors, str(path), metadata={"format": CHECKPOINT_FORMAT, "sh_degree": str(self.sh_degree),
                                                "extras": ",".join(self.extra_names)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "GaussianModel":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != CHECKPOINT_FORMAT:
                    raise UserError(f"{path} is not a talkinghead Gaussian checkpoint")
                tensors = {name: f.get_tensor(name) for name in PARAM_NAMES}
                extras = {name: f.get_tensor(name) for name in meta.get("extras", "").split(",") if name}
        except (OSError, SafetensorError) as exc:  # missing file, or not safetensors at all
            raise UserError(f"cannot read Gaussian checkpoint {path}: {exc}") from exc
        return cls(**tensors, extras=extras).to(device)

    def export_ply(self, path: str | Path) -> None:
        """Write the standard 3DGS ``.ply`` (binary little-endian) that splat viewers open.

        Properties, in order: x y z, nx ny nz (zeros), f_dc_0..2, f_rest_* (channel-major: all red
        coefficients, then green, then blue), opacity (logit), scale_0..2 (log), rot_0..3 (w, x, y, z).
        """
        n = len(self)
        with torch.no_grad():
            columns = [
                self.means, torch.zeros(n, 3), self.sh0[:, 0], self.shN.transpose(1, 2).reshape(n, -1),
                self.logit_opacities[:, None], self.log_scales, self.quats,
            ]  # fmt: skip
            data = torch.cat([c.detach().cpu().float() for c in columns], 1).numpy()
        names = _ply_names(self.shN.shape[1])
        header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
        header += "".join(f"property float {name}\n" for name in names) + "end_header\n"
        with open(path, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(np.ascontiguousarray(data, dtype="<f4").tobytes())

    @classmethod
    def load_ply(cls, path: str | Path) -> "GaussianModel":
        """Read a 3DGS ``.ply`` (ours or the reference implementation's: binary, float properties)."""
        with open(path, "rb") as f:
            if f.readline().strip() != b"ply":
                raise UserError(f"{path} is not a PLY file")
            names, n = [], None
            for line in iter(f.readline, b""):
                words = line.decode("ascii").split()
                if words[:2] == ["format", "ascii"] or words[:2] == ["format", "binary_big_endian"]:
                    raise UserError(f"{path}: only binary little-endian 3DGS PLY files are supported")
                if words[:2] == ["element", "vertex"]:
                    n = int(words[2])
                elif words[:1] == ["property"]:
                    if words[1] != "float":
                        raise UserError(f"{path}: property {words[-1]} is not float")
                    names.append(words[2])
                elif words[:1] == ["end_header"]:
                    break
            data = np.frombuffer(f.read(4 * n * len(names)), dtype="<f4").reshape(n, len(names))
        col = {name: torch.from_numpy(data[:, i].copy()) for i, name in enumerate(names)}
        n_rest = sum(name.startswith("f_rest_") for name in names) // 3
        try:
            stack = lambda *keys: torch.stack([col[k] for k in keys], 1)  # noqa: E731
            return cls(
                means=stack("x", "y", "z"),
                log_scales=stack("scale_0", "scale_1", "scale_2"),
                quats=stack("rot_0", "rot_1", "rot_2", "rot_3"),
                logit_opacities=col["opacity"],
                sh0=stack("f_dc_0", "f_dc_1", "f_dc_2")[:, None],
                shN=stack(*(f"f_rest_{i}" for i in range(3 * n_rest))).view(n, 3, n_rest).transpose(1, 2),
            )
        except KeyError as exc:
            raise UserError(f"{path}: missing 3DGS property {exc}") from exc


def _ply_names(n_rest: int) -> list[str]:
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(3 * n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def _neighbour_distance(points: Tensor, k: int = 3) -> Tensor:
    """[N] RMS distance to the k nearest other points (3DGS's initial scale), floored to stay positive."""
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy()
    if len(pts) <= 1:
        return torch.full((len(pts),), 0.01)
    dist, _ = cKDTree(pts).query(pts, k=min(k, len(pts) - 1) + 1)
    d = torch.from_numpy(np.sqrt((dist[:, 1:] ** 2).mean(1))).float()
    return d.clamp(min=1e-7)

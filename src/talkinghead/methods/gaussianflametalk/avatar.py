"""The person's rigged Gaussian head (sec. 3.1): Gaussians bound to the face mesh + a rigid shell, and the
per-frame pose/expression corrections optimised with them.

* Bound Gaussians (``rigging.bind_to_world``) sit on the triangles of the face model's mesh, plus curtain
  triangles closing the mouth and eyes (``rigging.fill_holes``). A frame's mesh is
  ``neutral + (tracked expression + correction) @ basis``.
* Shell Gaussians (hair, ears, back of the head) live in the head frame directly (``rigging.shell_points``).
* Per-frame parameters (GaussianFlameTalk sec. 3.1, "FLAME parameters (translation, rotation ...) were also
  optimized during training"; GaussianAvatars sec. 3.3): a head-pose correction ``[T, 6]`` (axis-angle,
  translation in metres), composed with the tracked viewmat as a rigid motion of the head, and an expression
  correction ``[T, E]``. They are zero-initialised and trained with the Gaussians, so mesh-Gaussian misalignment
  is absorbed by the parameters instead of blurring the Gaussians. Deviation: no per-frame scale (our head
  frame has a fixed metric scale).

Colours are SH coefficients (``sh_degree``), initialised from the first training frame by projecting each
Gaussian into it. Deviation from 3DGS/GaussianAvatars: no adaptive density control (fixed count, as our
GaussianTalker on the CPU budget); Gaussians are instead spread over the mesh up front, denser on the lips.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talkinghead.face.landmarks import LIPS_INNER, LIPS_OUTER
from talkinghead.methods.surface import points_on_triangles, project_colors
from talkinghead.render import num_sh_bases, rgb_to_sh

from talkinghead.render.raster_numba import available as numba_available

from .rigging import bind_activated, bind_numba, face_forward, fill_holes, shell_points, triangle_frames


def axis_angle_to_matrix(v: Tensor) -> Tensor:
    """Rodrigues: axis-angle [..., 3] -> rotation [..., 3, 3] (smooth at 0)."""
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    K = K - K.transpose(-1, -2)
    theta = torch.sqrt(theta2 + 1e-12)
    a = torch.where(theta2 < 1e-8, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(theta2 < 1e-8, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def corrected_viewmat(viewmat: Tensor, delta: Tensor) -> Tensor:
    """viewmat [4, 4] composed with a rigid head motion delta [6] (axis-angle, translation): the head is moved
    about its frame's origin before the camera sees it."""
    M = torch.eye(4, dtype=viewmat.dtype, device=viewmat.device)
    M = torch.cat([torch.cat([axis_angle_to_matrix(delta[:3]), delta[3:, None]], 1), M[3:]], 0)
    return viewmat @ M


class RiggedAvatar(nn.Module):
    """Rigged Gaussians of one person. Build with :meth:`initial` (from a dataset) or with sizes only
    (``load_state_dict`` then resizes every tensor to the saved one)."""

    def __init__(self, num_frames: int, num_expression: int, num_vertices: int, sh_degree: int = 0):
        super().__init__()
        K = num_sh_bases(sh_degree)
        self.sh_degree = sh_degree
        self.register_buffer("neutral", torch.zeros(num_vertices, 3))
        self.register_buffer("basis", torch.zeros(num_expression, num_vertices, 3))
        self.register_buffer("faces", torch.zeros(0, 3, dtype=torch.long))  # mesh + curtain triangles
        self.register_buffer("parent", torch.zeros(0, dtype=torch.long))  # [Nb]
        self.register_buffer("tracked_expression", torch.zeros(num_frames, num_expression))  # [T, E]
        self.register_buffer("trained_frames", torch.zeros(num_frames, dtype=torch.bool))  # corrections learned
        self.local_means = nn.Parameter(torch.zeros(0, 3))
        self.local_quats = nn.Parameter(torch.zeros(0, 4))
        self.local_log_scales = nn.Parameter(torch.zeros(0, 3))
        self.shell_means = nn.Parameter(torch.zeros(0, 3))
        self.shell_quats = nn.Parameter(torch.zeros(0, 4))
        self.shell_log_scales = nn.Parameter(torch.zeros(0, 3))
        self.sh = nn.Parameter(torch.zeros(0, K, 3))  # bound first, then shell
        self.opacity_logits = nn.Parameter(torch.zeros(0))
        self.pose_delta = nn.Parameter(torch.zeros(num_frames, 6))
        self.expression_delta = nn.Parameter(torch.zeros(num_frames, num_expression))

    @classmethod
    def initial(cls, dataset, per_triangle: int, lip_per_triangle: int, num_shell: int, sh_degree: int,
                seed: int = 0) -> "RiggedAvatar":
        """Gaussians spread over the dataset's face model (first training frame's colours)."""
        fm, tracks = dataset.face_model, dataset.tracks
        rng = np.random.default_rng(seed)
        neutral = fm.neutral.astype(np.float64)
        faces = np.asarray(fm.triangles, np.int64)
        curtains = fill_holes(faces, neutral).astype(np.int64)
        all_faces = np.concatenate([faces, curtains])
        lips = set(LIPS_OUTER) | set(LIPS_INNER)
        dense = np.array([any(int(v) in lips for v in f) for f in faces] + [True] * len(curtains))
        counts = np.where(dense, lip_per_triangle, per_triangle)
        # Place points on the mean training expression's mesh (mouths are rarely closed on average, so the
        # mouth curtain is not degenerate there).
        train = dataset.split_indices("train")
        mean_mesh = fm.vertices(tracks.expression[train].mean(0)).astype(np.float64)
        parent = np.repeat(np.arange(len(all_faces)), counts)  # counts[f] points on triangle f
        pts, _ = points_on_triangles(mean_mesh, all_faces[parent], rng)
        R, T, k = triangle_frames(torch.from_numpy(mean_mesh), torch.from_numpy(all_faces))
        Rp, Tp, kp = R[parent], T[parent], k[parent].clamp_min(1e-6)
        local = (Rp.transpose(-1, -2) @ (torch.from_numpy(pts) - Tp)[..., None]).squeeze(-1) / kp[:, None]
        # isotropic-ish discs covering each triangle's share of area, thin along the normal
        size = torch.sqrt(k[parent] ** 2 / 2 / torch.from_numpy(counts[parent]).double()).clamp_min(1e-5)
        log_s = torch.log(size / kp)[:, None].repeat(1, 3)
        log_s[:, 2] -= 1.0

        first = int(train[0])
        viewmat = tracks.viewmats[first].astype(np.float64)
        forward = face_forward(neutral, viewmat)
        shell, spacing = shell_points(neutral.astype(np.float32), forward, num_shell, seed=seed)
        image = dataset.frame(first).image
        colors = np.concatenate([project_colors(pts, viewmat, tracks.K, image),
                                 project_colors(shell.astype(np.float64), viewmat, tracks.K, image)])

        m = cls(len(tracks.expression), fm.num_expression, len(neutral), sh_degree)
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        m.neutral = f32(fm.neutral)
        m.basis = f32(fm.basis)
        m.faces = torch.from_numpy(all_faces)
        m.parent = torch.from_numpy(parent)
        m.tracked_expression = f32(tracks.expression)
        nb, ns = len(parent), len(shell)
        m.local_means = nn.Parameter(local.float())
        m.local_quats = nn.Parameter(torch.tensor([1.0, 0, 0, 0]).repeat(nb, 1))
        m.local_log_scales = nn.Parameter(log_s.float())
        m.shell_means = nn.Parameter(f32(shell))
        m.shell_quats = nn.Parameter(torch.tensor([1.0, 0, 0, 0]).repeat(ns, 1))
        m.shell_log_scales = nn.Parameter(torch.full((ns, 3), float(np.log(0.7 * spacing))))
        sh = torch.zeros(nb + ns, num_sh_bases(sh_degree), 3)
        sh[:, 0] = rgb_to_sh(f32(colors))
        m.sh = nn.Parameter(sh)
        m.opacity_logits = nn.Parameter(torch.zeros(nb + ns))
        return m

    @property
    def num_bound(self) -> int:
        return int(self.parent.numel())

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Resize every parameter and buffer to the saved one first (counts are data-dependent)."""
        for name, value in state.items():
            mod_name, _, attr = name.rpartition(".")
            mod = self.get_submodule(mod_name) if mod_name else self
            cur = getattr(mod, attr, None)
            if isinstance(cur, Tensor) and cur.shape != value.shape:
                new = torch.zeros(value.shape, dtype=cur.dtype)
                if isinstance(cur, nn.Parameter):
                    cur.data = new  # the same Parameter object: optimizers built before loading stay valid
                else:
                    setattr(mod, attr, new)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def frame_expression(self, index: int, optimized: bool = True, delta: Tensor | None = None) -> Tensor:
        """Tracked expression of frame ``index`` [E], plus its learned correction when ``optimized``
        (``delta`` [T, E] replaces the raw corrections, e.g. smoothed ones)."""
        e = self.tracked_expression[index]
        return e + (self.expression_delta if delta is None else delta)[index] if optimized else e

    def frame_viewmat(self, index: int, viewmat: Tensor, delta: Tensor | None = None) -> Tensor:
        """The tracked viewmat [4, 4] with frame ``index``'s learned head-pose correction (``delta`` [T, 6]
        replaces the raw corrections)."""
        return corrected_viewmat(viewmat, (self.pose_delta if delta is None else delta)[index])

    def smoothed_corrections(self, radius: int) -> tuple[Tensor, Tensor]:
        """Per-frame corrections averaged over the trained frames within ``radius`` frames: pose [T, 6],
        expression [T, E]. Each frame is visited only a few times in a CPU-budget run, so its own correction
        carries frame-to-frame noise that would wobble a replay; the misalignment it corrects drifts slowly."""
        w = self.trained_frames.float()[None, None]  # [1, 1, T]
        kernel = torch.ones(1, 1, 2 * radius + 1, dtype=w.dtype, device=w.device)
        norm = F.conv1d(w, kernel, padding=radius)[0, 0].clamp_min(1e-9)  # [T]

        def smooth(x: Tensor) -> Tensor:  # [T, C]
            y = F.conv1d((x.T * w[0])[:, None], kernel, padding=radius)[:, 0]  # [C, T]
            return (y / norm).T

        return smooth(self.pose_delta), smooth(self.expression_delta)

    def mesh(self, expression: Tensor) -> Tensor:
        """[..., E] -> [..., V, 3] in the head frame."""
        return self.neutral + torch.einsum("...e,evc->...vc", expression, self.basis)

    def static(self) -> dict[str, Tensor]:
        """What does not depend on the expression: the rigid shell's Gaussians, every opacity and colour, and the
        bound Gaussians' activated local rotations and scales (a renderer keeps them once per avatar)."""
        return {"local_quats": F.normalize(self.local_quats, dim=-1), "local_scales": torch.exp(self.local_log_scales),
                "shell_quats": F.normalize(self.shell_quats, dim=-1), "shell_scales": torch.exp(self.shell_log_scales),
                "opacities": torch.sigmoid(self.opacity_logits)}

    def gaussians(self, expression: Tensor, static: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Head-frame Gaussians for an expression [E]: means [N, 3], quats [N, 4], scales [N, 3],
        opacities [N], sh [N, K, 3] (bound first, then shell). ``static``: :meth:`static`, precomputed."""
        s = self.static() if static is None else static
        verts = self.mesh(expression)
        if static is not None and not torch.is_grad_enabled() and verts.device.type == "cpu" and numba_available():
            # rendering: the binding as one compiled loop, written into the frame's arrays (shell rows copied)
            nb, n = self.num_bound, self.opacity_logits.shape[0]
            dt = self.local_means.dtype
            means, quats, scales = (torch.empty(n, k, dtype=dt) for k in (3, 4, 3))
            bind_numba(verts, self.faces, self.parent, self.local_means, s["local_quats"], s["local_scales"],
                       (means[:nb], quats[:nb], scales[:nb]))
            means[nb:], quats[nb:], scales[nb:] = self.shell_means, s["shell_quats"], s["shell_scales"]
            return {"means": means, "quats": quats, "scales": scales, "opacities": s["opacities"], "sh": self.sh}
        bm, bq, bs = bind_activated(verts, self.faces, self.parent, self.local_means, s["local_quats"],
                                    s["local_scales"])
        return {
            "means": torch.cat([bm, self.shell_means]),
            "quats": torch.cat([bq, s["shell_quats"]]),
            "scales": torch.cat([bs, s["shell_scales"]]),
            "opacities": s["opacities"],
            "sh": self.sh,
        }

    def binding_regularisers(self, eps_position: float, eps_scale: float) -> tuple[Tensor, Tensor]:
        """GaussianAvatars' position and scale losses (sec. 3.4): keep bound Gaussians near, and no larger
        than, their triangles (in units of the triangle's size)."""
        pos = F.relu(self.local_means.norm(dim=-1) - eps_position).mean()
        scale = F.relu(torch.exp(self.local_log_scales) - eps_scale).mean()
        return pos, scale

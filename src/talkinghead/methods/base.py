"""The small contract every method satisfies, and the config pieces every method's config contains.

Shapes: H, W the training/render size; D the per-frame audio feature size; R the audio window radius.

* :class:`Condition` -- what a method may look at to render frame n (no ground truth): camera, backdrop
  (background plate + torso of that frame, head removed), audio window, blink, and -- only for methods
  whose config asks for it (``DataConfig.source_frames``) -- the :class:`SourceFrame`: the video frame the
  pose and backdrop come from, its parsing and tracked expression. Render-time driving builds the same
  object from new audio (the source frames then replay the training sequence, as pose and torso do), so a
  method cannot accidentally depend on training-only inputs.
* :class:`Batch` -- a Condition plus the ground truth of that frame (image, region masks, mouth crop).
* :class:`Method` -- the protocol the trainer and renderer call; a ``torch.nn.Module`` implementing the five
  methods below satisfies it (composition: a method holds its sub-networks, it does not inherit a base model).
* :class:`MethodSpec` -- a method as data: config type, ``make_config(preset, variant)``, ``build``.
* :class:`RenderCache` -- how a method prepares itself for rendering: what does not depend on the frame
  (canonical attributes, static Gaussians' activations, features of fixed positions) is computed once per
  avatar, without autograd, and rebuilt by itself when the weights change (training, loading, ``.to()``).

Configs are plain dataclasses. A method's config *contains* ``data: DataConfig`` and ``schedule:
Schedule`` (read by the shared data loader and trainer) beside its own fields; :func:`config_to_dict` /
:func:`config_from_dict` turn any of them into JSON and back, so an avatar records exactly how it was trained.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@dataclass
class DataConfig:
    """How the shared loader presents a prepared dataset to a method."""

    size: int = 128  # training/render side in pixels (the dataset is square)
    audio_radius: int = 8  # audio window = features of frames n-R .. n+R (2R+1 rows)
    mouth_crop: int = 0  # >0: also load a mouth crop of this many pixels wide from the full-size frames
    mouth_margin: float = 0.35  # crop box = lips' landmark box grown by this fraction of its width
    source_frames: bool = False  # give every Condition its SourceFrame (image, parsing, expression), also at render


@dataclass
class Schedule:
    """The trainer's loop: how long, how often to validate and checkpoint."""

    iterations: int = 3000
    val_every: int = 500  # write validation PNGs + loss curve every this many iterations (0: only at the end)
    checkpoint_every: int = 500  # save a resumable checkpoint every this many iterations
    seed: int = 0
    # Iterations by the length of the training clip, when a preset sets them: knots (seconds of training
    # frames, iterations), linear between knots and held beyond the ends. The trainer applies them to a fresh
    # run without ``--iterations`` (:meth:`for_clip`); the avatar's config records the result in ``iterations``.
    clip_seconds: tuple[float, ...] = ()
    clip_iterations: tuple[int, ...] = ()

    def for_clip(self, seconds: float) -> int:
        """Iterations for a training clip of ``seconds``: the knots' interpolation, or ``iterations`` when the
        preset sets no knots."""
        if not self.clip_seconds:
            return self.iterations
        return int(round(float(np.interp(seconds, self.clip_seconds, self.clip_iterations))))


def adam(groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """Adam over named parameter groups (``{"params", "lr", "name"}``), each remembering its ``initial_lr``
    for :func:`decay_learning_rates`. eps 1e-15 as 3DGS (Gaussian parameters have tiny gradients).

    The fused implementation (one kernel over all tensors instead of ~10 ops per tensor: ~7x faster on a CPU for
    a method's ~60 small tensors, the same update to float rounding) whenever torch has it for the parameters."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params) and all(
        p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.Adam(groups, eps=1e-15, fused=fused or None)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def decay_learning_rates(opt: torch.optim.Optimizer, step: int, iterations: int, final: Callable[[str], float]) -> None:
    """3DGS's exponential decay: group ``name`` goes from its ``initial_lr`` to ``final(name)`` times it at the
    last iteration (log-linear in between)."""
    t = min(1.0, (step + 1) / max(1, iterations))
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * math.exp(t * math.log(final(group["name"])))


@dataclass
class DatasetInfo:
    """What a model needs to know about its dataset to be built (saved in the avatar's config.json)."""

    num_frames: int
    fps: float
    size: int  # training side in pixels
    audio_dim: int  # D
    audio_names: list[str]  # [D] column names of the audio features the avatar was trained on (a record)
    expression_dim: int = 0  # E of the dataset's face model
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceFrame:
    """The video frame a Condition replays (frame ``Condition.index``: the one its pose and backdrop come from).

    For methods that keep parts of the real frame (DEGSTalk's hair plate) or read its non-speech expression.
    Self-driven, it is the ground-truth frame itself; driven by new audio, a training frame replayed in
    sequence. A method must only use what the driving audio does not decide (hair, eyes), never the mouth:
    the method's docstring says which parts it reads."""

    image: Tensor  # [H, W, 3] the frame in [0, 1]
    labels: Tensor  # [H, W] uint8 parsing labels (0 background, 1 torso, 2 hair, 3 face skin, 4 inner mouth)
    expression: Tensor  # [E] tracked expression coefficients of the face model

    def to(self, device: torch.device | str) -> "SourceFrame":
        return SourceFrame(self.image.to(device), self.labels.to(device), self.expression.to(device))


@dataclass
class Condition:
    """Inputs to render one frame. ``index`` is the source frame of pose/backdrop (-1 if none).

    The Condition says the size to render at: ``backdrop`` is [H, W, 3] at that size (``height``, ``width``)
    and ``K`` is in pixels of it. While training it is the training size; ``talkinghead render --size N``
    asks for any N (:class:`talkinghead.methods.data.Conditions`: backdrop read at N, ``K`` scaled). A
    Gaussian method rasterizes at the Condition's size; a method whose core has a fixed resolution (a NeRF
    with a super-resolution module) renders its core as trained and upsamples to the Condition's size.
    ``viewmat`` is the camera: a render-time camera change (a head turn) replaces it, nothing else."""

    viewmat: Tensor  # [4, 4] world (head) -> camera
    K: Tensor  # [3, 3] at the render size
    backdrop: Tensor  # [H, W, 3] background + torso, head removed, in [0, 1]; H, W = the render size
    audio: Tensor  # [2R+1, D] normalised audio features around the frame
    blink: Tensor  # [2] (right, left) 0 open .. 1 closed
    index: int = -1
    # [4, 4] the tracked pose of the source frame when ``viewmat`` was moved away from it for a novel view
    # (``render --yaw/--pitch``); None when they are the same. Pose-conditioned inputs read :attr:`pose`.
    tracked_viewmat: Tensor | None = None
    source: SourceFrame | None = None  # only with DataConfig.source_frames
    # px^2 screen-space low-pass a Gaussian method rasterizes with (``rasterize(eps2d=)``): 3DGS's 0.3 at the
    # training size; the renderer widens it above (:func:`talkinghead.methods.render.render_condition`).
    eps2d: float = 0.3

    def to(self, device: torch.device | str) -> "Condition":
        tracked = None if self.tracked_viewmat is None else self.tracked_viewmat.to(device)
        return dataclasses.replace(self, viewmat=self.viewmat.to(device), K=self.K.to(device),
                                   backdrop=self.backdrop.to(device), audio=self.audio.to(device),
                                   blink=self.blink.to(device), tracked_viewmat=tracked,
                                   source=None if self.source is None else self.source.to(device))

    @property
    def pose(self) -> Tensor:
        """[4, 4] the frame's tracked head pose (what pose tokens condition on), even under a novel view."""
        return self.viewmat if self.tracked_viewmat is None else self.tracked_viewmat

    @property
    def width(self) -> int:
        return int(self.backdrop.shape[1])

    @property
    def height(self) -> int:
        return int(self.backdrop.shape[0])


@dataclass
class MouthCrop:
    """The mouth region of a frame at a finer sampling than the training size (for the lip loss)."""

    K: Tensor  # [3, 3] intrinsics of the crop camera (same viewmat)
    image: Tensor  # [h, w, 3] ground truth crop
    backdrop: Tensor  # [h, w, 3] backdrop crop


@dataclass
class Batch:
    """One training frame: its Condition and its ground truth."""

    cond: Condition
    image: Tensor  # [H, W, 3] ground truth in [0, 1]
    head_mask: Tensor  # [H, W] 1 on hair + face + mouth
    face_mask: Tensor  # [H, W] 1 on face skin + mouth
    mouth_box: Tensor  # [4] (x0, y0, x1, y1) pixels at the training size
    expression: Tensor  # [E] tracked expression coefficients of the face model (prepare's fit)
    mouth: MouthCrop | None = None

    def to(self, device: torch.device | str) -> "Batch":
        mouth = None if self.mouth is None else MouthCrop(
            self.mouth.K.to(device), self.mouth.image.to(device), self.mouth.backdrop.to(device))
        return Batch(cond=self.cond.to(device), image=self.image.to(device), head_mask=self.head_mask.to(device),
                     face_mask=self.face_mask.to(device), mouth_box=self.mouth_box.to(device),
                     expression=self.expression.to(device), mouth=mouth)


@runtime_checkable
class Method(Protocol):
    """What the trainer and the renderer call. Nothing else about a method is assumed.

    Optional: ``log_extras() -> dict``, merged into ``train_log.json`` (e.g. whether LPIPS was on)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers over all trainable parameters (rebuilt on resume, then their state is loaded)."""

    def train_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss for one frame at iteration ``step`` and named figures for the log."""

    def after_step(self, step: int) -> None:
        """Called after the optimizers stepped (learning-rate schedules, densification...)."""

    def render(self, cond: Condition) -> Tensor:
        """The frame [cond.height, cond.width, 3] in [0, 1] (no grad needed), at any size the Condition asks
        for -- not only the training size (the renderer checks the shape). Per-avatar work belongs in a
        :class:`RenderCache`."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> Any: ...


class RenderCache:
    """Frame-independent values a method renders with, built once per avatar state (the "frozen" state).

    ``cache = RenderCache(build)`` in the method's ``__init__``; in the render path ``frozen = cache.get(self)``
    returns ``build()`` (computed under ``no_grad``, then kept) while the module is in eval mode, and ``None`` in
    training mode, where the method computes the same values live, with autograd. A call in training mode drops
    the kept value (a fused optimiser step does not bump tensors' version counters), and in eval mode it is
    rebuilt whenever any parameter or buffer was replaced, moved or modified in place (the key is each tensor's
    identity, storage and version counter, which ``load_state_dict`` and in-place edits bump). So neither
    training, loading nor ``.to(device)`` leaves a stale cache, and no method needs to override ``train()`` for
    it. Rendering a frame then only computes what depends on it.
    """

    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, module: torch.nn.Module) -> Any:
        if module.training:
            self.clear()
            return None
        key = tuple((id(t), t.data_ptr(), t._version, t.device) for t in _tensors(module))
        if key != self._key:
            with torch.no_grad():
                self._value = self._build()
            self._key = key
        return self._value

    def clear(self) -> None:
        """Drop the kept value (e.g. when a non-tensor attribute the build reads changed)."""
        self._key, self._value = None, None


def _tensors(module: torch.nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``module`` and its submodules (shared ones repeated): what
    ``parameters()`` + ``buffers()`` visit, without their name bookkeeping (checked on every rendered frame)."""
    out: list[Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        out.extend(t for t in m._parameters.values() if t is not None)
        out.extend(t for t in m._buffers.values() if t is not None)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


@dataclass(frozen=True)
class MethodSpec:
    """A method as data (registered by name in :mod:`talkinghead.methods`)."""

    name: str
    description: str
    config_type: type
    make_config: Callable[[str, str | None], Any]  # (preset, variant) -> config dataclass
    build: Callable[..., Method]  # (config, DatasetInfo, dataset=None) -> model; dataset given for a fresh start
    presets: tuple[str, ...] = ("cpu-small", "gpu")
    variants: tuple[str, ...] = ()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A (nested) config dataclass as JSON-ready dict."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from :func:`config_to_dict`'s output; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(tp, value)
        elif isinstance(value, list) and typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)

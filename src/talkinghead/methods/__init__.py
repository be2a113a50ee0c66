"""Methods: how a prepared dataset becomes an avatar, and how an avatar renders frames.

A method plugs in as data, not as a subclass (see :mod:`talkinghead.methods.base`):

1. write a config dataclass that *contains* the shared pieces (``data: DataConfig``, ``schedule: Schedule``)
   next to the method's own fields, and a function ``make_config(preset, variant) -> config``;
2. write a model (usually a ``torch.nn.Module``) satisfying the :class:`~talkinghead.methods.base.Method`
   protocol: ``optimizers()``, ``train_loss(batch, step)``, ``after_step(step)``, ``render(cond)``,
   ``state_dict()`` / ``load_state_dict()``, built by ``build(config, info, dataset=None)``;
3. register both under a name at the bottom of the method's module::

       register_method(MethodSpec(name="mymethod", description="...", config_type=MyConfig,
                                  make_config=make_config, build=MyModel.build,
                                  presets=("cpu-small", "gpu"), variants=("fast",)))

4. add the module to ``_BUILTIN`` below so that ``get_method("mymethod")`` imports it on first use.

One trainer (:mod:`.trainer`) and one renderer (:mod:`.render`) then serve every method:
``talkinghead train DATA --method mymethod`` and ``talkinghead render AVATAR`` work without further code.
Live streaming (:mod:`.streaming`, used by ``talkinghead serve``) needs nothing more from a method whose frames
depend only on their Condition; a method that keeps state across frames adds ``open_stream()`` returning an
object with ``render(cond)``, ``reset()`` and ``lookahead`` (audio rows past the frame it reads), so sessions
sharing one model keep separate histories (GaussianFlameTalk does).
Nothing is imported here beyond the registry itself: importing this package stays cheap and silent.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from talkinghead.errors import UserError

if TYPE_CHECKING:
    from .base import MethodSpec

# name -> module whose import registers it (imported lazily, on first look-up).
_BUILTIN: dict[str, str] = {
    "gaussiantalker": "talkinghead.methods.gaussiantalker",
    "gaussianflametalk": "talkinghead.methods.gaussianflametalk",
    "talk3d": "talkinghead.methods.talk3d",
    "degstalk": "talkinghead.methods.degstalk",
}
_REGISTRY: dict[str, "MethodSpec"] = {}


def register_method(spec: "MethodSpec") -> None:
    """Make a method available by ``spec.name`` (re-registering the same name replaces it)."""
    _REGISTRY[spec.name] = spec


def available_methods() -> list[str]:
    """Names of every method, built-in or registered, sorted."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_method(name: str) -> "MethodSpec":
    """The registered method ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r} (available: {', '.join(available_methods())})")
    return _REGISTRY[name]


def render_split(avatar: Path, data: Path, split: str, out_mp4: Path, size: int | None = None,
                 full_frame: bool | None = None, source: Path | None = None) -> dict:
    """Render ``split`` of the prepared dataset ``data`` with its own audio and poses (self-driven).

    Writes ``out_mp4`` (with the split's audio) and returns ``{"fps": rendered frames per second,
    "frames": frame count, ...}``; ``size`` is the render side (default: the dataset's), ``full_frame`` pastes
    the renders into the source video (None: when it is at hand). See
    :func:`talkinghead.methods.render.render_split`.
    """
    from .render import render_split as _render_split

    return _render_split(avatar, data, split, out_mp4, size=size, full_frame=full_frame, source=source)


__all__ = ["register_method", "get_method", "available_methods", "render_split"]

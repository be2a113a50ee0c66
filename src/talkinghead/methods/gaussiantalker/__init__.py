"""GaussianTalker (audio-driven 3D Gaussian splatting with spatial-audio attention), registered as ``gaussiantalker``.

Modules: :mod:`.config` (presets, variants), :mod:`.attention` (tokens + eqs. 10-13), :mod:`.deformation`
(F_can, F_deform: eqs. 8, 14), :mod:`.model`; shared: initial points (:mod:`talkinghead.methods.surface`),
triplane (eq. 7, :mod:`talkinghead.nn.triplane`), audio encoder (:mod:`talkinghead.nn.audio`).
"""

from talkinghead.methods import register_method
from talkinghead.methods.base import MethodSpec

from .config import GaussianTalkerConfig, make_config
from .model import GaussianTalker

register_method(MethodSpec(
    name="gaussiantalker",
    description="GaussianTalker: triplane-encoded 3D Gaussians deformed by spatial-audio cross-attention",
    config_type=GaussianTalkerConfig,
    make_config=make_config,
    build=GaussianTalker.build,
    presets=("cpu-small", "gpu"),
    variants=("fast",),
))

__all__ = ["GaussianTalker", "GaussianTalkerConfig", "make_config"]

"""Talk3D (audio-guided attention U-Net editing a triplane NeRF head), registered as ``talk3d``.

Modules: :mod:`.config` (presets), :mod:`.unet` (split convolutions, roll-out, bottleneck attention: eqs. 4-5),
:mod:`.model` (identity triplane, tokens, stages, losses). The renderer is the shared
:mod:`talkinghead.render.volume` + :mod:`talkinghead.render.superres`.
"""

from talkinghead.methods import register_method
from talkinghead.methods.base import MethodSpec

from .config import Talk3DConfig, make_config
from .model import Talk3D

register_method(MethodSpec(
    name="talk3d",
    description="Talk3D: a triplane NeRF head (volume rendering + super-resolution) edited per frame by an "
                "audio-guided attention U-Net",
    config_type=Talk3DConfig,
    make_config=make_config,
    build=Talk3D.build,
    presets=("cpu-small", "gpu"),
    variants=(),
))

__all__ = ["Talk3D", "Talk3DConfig", "make_config"]

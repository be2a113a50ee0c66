"""GaussianFlameTalk: FlameTalk (audio -> expression transformer) driving a mesh-rigged Gaussian avatar.

Modules: :mod:`.rigging` (Gaussians bound to triangles, hole curtains, rigid shell), :mod:`.flametalk`
(sec. 3.2), :mod:`.avatar` (sec. 3.1), :mod:`.model` (the method), :mod:`.config` (presets, stages).
Importing this package registers the method ``gaussianflametalk``.
"""

from talkinghead.methods import register_method
from talkinghead.methods.base import MethodSpec

from .config import STAGES, GaussianFlameTalkConfig, make_config
from .model import GaussianFlameTalk

register_method(MethodSpec(
    name="gaussianflametalk",
    description="GaussianFlameTalk: FlameTalk audio->expression transformer driving a mesh-rigged Gaussian avatar",
    config_type=GaussianFlameTalkConfig,
    make_config=make_config,
    build=GaussianFlameTalk.build,
    presets=("cpu-small", "gpu"),
    variants=STAGES,
))

__all__ = ["GaussianFlameTalk", "GaussianFlameTalkConfig", "make_config"]

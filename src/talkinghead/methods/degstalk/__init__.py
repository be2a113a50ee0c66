"""DEGSTalk: decomposed per-embedding Gaussian fields for hair-preserving talking faces, registered as ``degstalk``.

Modules: :mod:`.config` (presets, ablation variants), :mod:`.fields` (deformable pre-embedding Gaussian
field, eqs. 4-6), :mod:`.expression` (implicit expression coefficients f_e, the jaw target), :mod:`.plate`
(hair plate and region masks, eq. 7), :mod:`.model` (the method, its three stages).
"""

from talkinghead.methods import register_method
from talkinghead.methods.base import MethodSpec

from .config import VARIANTS, DEGSTalkConfig, make_config
from .model import DEGSTalk

register_method(MethodSpec(
    name="degstalk",
    description="DEGSTalk: per-embedding face and mouth Gaussian fields with hair-preserving fusion",
    config_type=DEGSTalkConfig,
    make_config=make_config,
    build=DEGSTalk.build,
    presets=("cpu-small", "gpu"),
    variants=tuple(VARIANTS),
))

__all__ = ["DEGSTalk", "DEGSTalkConfig", "make_config"]

"""orthora: Learnable Orthogonal Representation Alignment, a PEFT plugin.

``import orthora`` registers the method with PEFT, so ``get_peft_model(model, orthora.OrthoConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for PEFT's own methods.
"""

from ._peft_compat import ORTHORA_PEFT_TYPE, check_peft_version, register

check_peft_version()

from . import rotations  # noqa: E402
from .config import OrthoConfig  # noqa: E402
from .layer import BlockRotation, OrthoLayer  # noqa: E402
from .model import OrthoModel  # noqa: E402

register(OrthoConfig, OrthoModel, prefix=OrthoModel.prefix)

from . import _peft_compat, hub  # noqa: E402

_peft_compat.route_push_to_hub(hub.push_peft_model)

__version__ = "0.1.0"
__all__ = [
    "OrthoConfig",
    "OrthoModel",
    "OrthoLayer",
    "BlockRotation",
    "rotations",
    "ORTHORA_PEFT_TYPE",
    "__version__",
]

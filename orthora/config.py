"""`OrthoConfig`: the user-facing configuration of an orthora adapter.

Everything that can be checked without the model is checked here, in ``__post_init__``, so a bad value is
reported before any weight is touched. Checks that need layer widths run in the tuner's pre-injection pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from safetensors import SafetensorError, safe_open

from ._peft_compat import ORTHORA_PEFT_TYPE
from .rotations import PARAMETRIZATIONS, Parametrization, get_parametrization

SIDES = ("output", "input", "both")
BIAS_OPTIONS = ("none", "all", "ortho_only")

#: Version of the on-disk adapter layout. Bump it when parameter names or shapes change (and add a converter in
#: `orthora.model.OrthoModel._remap_adapter_state_dict_for_load`) or when a default changes (and record the old
#: value in `FORMER_DEFAULTS`), so adapters saved by older releases keep loading as they were trained.
FORMAT_VERSION = 2

#: Defaults that changed, as the files of each older format version had them. PEFT writes every field, so a field
#: is missing from a saved config only when the file predates the field, i.e. it was trained with the behaviour of
#: that field's old default: such a file loads with the old value, not today's default (`OrthoConfig.check_kwargs`).
FORMER_DEFAULTS: dict[int, dict[str, Any]] = {1: {"generator_scale": 1.0, "magnitude": False}}


class _DefaultBlockSize(int):
    """The default block size, distinguishable (by identity) from a block size the user typed.

    It lets ``OrthoConfig(num_blocks=4)`` mean "4 blocks" while ``OrthoConfig(block_size=32, num_blocks=4)``
    is rejected as ambiguous, and lets the default depend on the side. It serialises as a plain integer.
    """


DEFAULT_BLOCK_SIZE = _DefaultBlockSize(32)

#: The block size when ``block_size`` is left at its default: LoRA r = 8's parameter budget on a square layer,
#: (b - 1)/2 generator entries per feature and side, so half the block when both sides rotate.
DEFAULT_BLOCK_SIZE_BY_SIDE = {"output": 32, "input": 32, "both": 16}


@dataclass
class OrthoConfig(PeftConfig):
    """Configuration of an orthora adapter: learnable block-diagonal orthogonal transforms of layer representations.

    For a targeted layer ``f(x) = W x + b``:

    * ``side="output"``: ``y = R f(x)``, merged as ``W' = R W``, ``b' = R b`` (the form the method was first
      described with);
    * ``side="input"`` (the OFT form): ``y = W (R x) + b``, merged as ``W' = W R``;
    * ``side="both"`` (default): ``y = R_out W R_in x + R_out b``.

    With the default ``magnitude=True`` a learned per-output-feature scale follows: ``y = s * (...)``, merged into
    the weights too. The defaults (both sides, block 16, magnitude, ``generator_scale="auto"``) are the form the
    quality benchmark favoured (docs/benchmarks.md); ``magnitude=False`` keeps a pure rotation.

    ``R`` is block diagonal with blocks of ``block_size`` (or ``num_blocks`` blocks); every block is orthogonal by
    construction through ``parametrization`` and is exactly the identity at initialisation.
    """

    side: Literal["output", "input", "both"] = field(
        default="both",
        metadata={
            "help": "Which representation to rotate: 'output' (y = R f(x)), 'input' (f(R x)) or 'both' "
            "(y = R_out W R_in x + R_out b)."
        },
    )
    block_size: Optional[int] = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={
            "help": "Size b of each orthogonal block (must divide the rotated width). Exclusive with num_blocks. "
            "Default: 16 with side='both', 32 with one side (LoRA r=8's parameter budget either way)."
        },
    )
    num_blocks: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number k of orthogonal blocks per layer (block size = width / k). Exclusive with block_size."
        },
    )
    parametrization: Literal["cayley", "cayley_neumann", "exp", "householder"] = field(
        default="cayley",
        metadata={
            "help": "Map from free parameters to an orthogonal block: "
            + "; ".join(f"'{spec.name}' ({spec.description})" for spec in PARAMETRIZATIONS.values())
            + "."
        },
    )
    neumann_terms: int = field(
        default=5, metadata={"help": "Number of Neumann-series terms for parametrization='cayley_neumann'."}
    )
    num_reflections: int = field(
        default=2,
        metadata={"help": "Householder reflections per block (even, so the adapter starts at the identity)."},
    )
    block_share: bool = field(
        default=False,
        metadata={"help": "Share one rotation across all blocks of a layer (k times fewer parameters)."},
    )
    max_angle: Optional[float] = field(
        default=None,
        metadata={
            "help": "Constrained variant: keep the Frobenius norm of each block's skew-symmetric generator within "
            "this radius (a bound on how far R can move from the identity). None = unconstrained."
        },
    )
    generator_scale: Union[float, str] = field(
        default="auto",
        metadata={
            "help": "Factor on each block's skew generator (for Householder: on its initial vectors' inverse), which "
            "under Adam is a learning-rate multiplier for the rotations alone. 'auto' = the parametrization's "
            "auto_scale (1/(2 sqrt(b)) for Cayley, 1/sqrt(b) for exp, 0.4 for Householder): one optimizer step then "
            "turns a block by about the learning rate in radians whatever its size, while the head keeps the full "
            "learning rate."
        },
    )
    magnitude: bool = field(
        default=True,
        metadata={
            "help": "Also learn a per-output-feature scale s, y = s * (R_out f(R_in x)), initialised to 1 and merged "
            "into the weights like the rotation. The adapter is then no longer norm-preserving (d_out extra "
            "parameters per layer). False = a pure rotation."
        },
    )
    module_dropout: float = field(
        default=0.0,
        metadata={
            "help": "During training, replace each block's rotation by the identity with this probability."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match), a regex, or 'all-linear'. Default: a per-architecture mapping."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave untouched."}
    )
    bias: Literal["none", "all", "ortho_only"] = field(
        default="none",
        metadata={"help": "Which biases to train: 'none', 'all' or 'ortho_only' (targeted layers)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: every rotation starts at the identity. False: random rotations (for tests only)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the nn.ModuleList holding the layers (used with layers_to_transform)."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Extra modules (e.g. a classifier head) that are trained fully and saved with the adapter."
        },
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Adapter file layout version (set automatically)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ORTHORA_PEFT_TYPE
        self._resolve_block_shape()
        if self.side not in SIDES:
            raise ValueError(f"OrthoConfig: unknown side={self.side!r}; valid values are {', '.join(SIDES)}.")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"OrthoConfig: unknown parametrization={self.parametrization!r}; "
                f"valid values are {', '.join(PARAMETRIZATIONS)}."
            )
        spec = self.parametrization_spec
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(
                f"OrthoConfig: unknown bias={self.bias!r}; valid values are {', '.join(BIAS_OPTIONS)}."
            )
        if not isinstance(self.neumann_terms, int) or self.neumann_terms < 1:
            raise ValueError(
                f"OrthoConfig: neumann_terms must be a positive integer, got {self.neumann_terms!r}."
            )
        if not isinstance(self.num_reflections, int) or self.num_reflections < 1:
            raise ValueError(
                f"OrthoConfig: num_reflections must be a positive integer, got {self.num_reflections!r}."
            )
        if not spec.uses_generator and self.init_weights and self.num_reflections % 2:
            raise ValueError(
                f"OrthoConfig: num_reflections={self.num_reflections} is odd; the identity initialisation pairs equal "
                "reflections, so use an even number (e.g. 2 or 4), or init_weights=False."
            )
        if self.max_angle is not None and not self.max_angle > 0:
            raise ValueError(
                f"OrthoConfig: max_angle must be a positive number or None, got {self.max_angle!r}."
            )
        if self.max_angle is not None and not spec.uses_generator:
            valid = ", ".join(name for name, other in PARAMETRIZATIONS.items() if other.uses_generator)
            raise ValueError(
                f"OrthoConfig: max_angle bounds a skew-symmetric generator, which parametrization="
                f"{self.parametrization!r} does not have; use max_angle=None or one of {valid}."
            )
        if self.generator_scale != "auto" and (
            isinstance(self.generator_scale, bool)
            or not isinstance(self.generator_scale, (int, float))
            or not math.isfinite(self.generator_scale)
            or self.generator_scale <= 0
        ):
            raise ValueError(
                f"OrthoConfig: generator_scale must be a positive number or 'auto', got {self.generator_scale!r}."
            )
        if not isinstance(self.magnitude, bool):
            raise ValueError(f"OrthoConfig: magnitude must be True or False, got {self.magnitude!r}.")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"OrthoConfig: module_dropout must be in [0, 1), got {self.module_dropout!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"OrthoConfig: this adapter uses orthora format version {self.format_version}, but the installed "
                f"orthora reads versions up to {FORMAT_VERSION}; upgrade orthora to load it."
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "OrthoConfig: layers_pattern only has an effect together with layers_to_transform."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "OrthoConfig: layers_to_transform cannot be used when target_modules is a regex string."
            )

    def _resolve_block_shape(self) -> None:
        block_size_is_default = self.block_size is DEFAULT_BLOCK_SIZE
        if self.num_blocks is not None and block_size_is_default:
            self.block_size = None
        elif block_size_is_default:
            self.block_size = DEFAULT_BLOCK_SIZE_BY_SIDE.get(self.side, DEFAULT_BLOCK_SIZE)
        if self.block_size is not None and self.num_blocks is not None:
            raise ValueError(
                f"OrthoConfig: set exactly one of block_size and num_blocks, got block_size={self.block_size} and "
                f"num_blocks={self.num_blocks} (block_size x num_blocks must equal each layer's width)."
            )
        if self.block_size is None and self.num_blocks is None:
            raise ValueError(
                "OrthoConfig: set exactly one of block_size and num_blocks; both are None "
                "(e.g. block_size=32, or num_blocks=8)."
            )
        for name in ("block_size", "num_blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"OrthoConfig: {name} must be a positive integer, got {value!r}.")
        if self.block_size is not None:
            self.block_size = int(self.block_size)  # drop the default marker so it serialises as a plain int

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT's hook for a config read from a file: a field the file lacks gets its format's former default.

        A file without ``format_version`` is of format 1, the first.
        """
        former = FORMER_DEFAULTS.get(kwargs.get("format_version", 1), {})
        return super().check_kwargs(**{**former, **kwargs})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> OrthoConfig:
        """Load the config and, for a local adapter folder, check its weights file before any model is touched.

        PEFT injects the adapter layers before it reads the weights, so a truncated or corrupt file would otherwise
        be discovered only after the base model was modified.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = os.path.join(folder, "adapter_model.safetensors")
        if os.path.isdir(folder) and os.path.isfile(weights):
            check_safetensors_file(weights)
        return config

    @property
    def parametrization_spec(self) -> Parametrization:
        """The entry of :data:`orthora.rotations.PARAMETRIZATIONS` for this config's parametrization."""
        return get_parametrization(self.parametrization)

    def scale_for(self, block_size: int) -> float:
        """The numeric generator scale of a rotation with blocks of ``block_size`` (resolves ``'auto'``)."""
        if self.generator_scale == "auto":
            return self.parametrization_spec.auto_scale(block_size)
        return float(self.generator_scale)

    @property
    def is_exact(self) -> bool:
        """True when every rotation is orthogonal to machine precision (see the parametrization table)."""
        return self.parametrization_spec.exact


def check_safetensors_file(path: str) -> None:
    """Raise a ValueError naming ``path`` if it is not a complete safetensors file (header and every tensor's bytes).

    safetensors' own reader validates the header and that the tensors cover the file exactly; its reason is kept.
    """
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise ValueError(
            f"adapter weights file {path} is corrupt or truncated ({reason}; {os.path.getsize(path)} bytes on "
            "disk); save or download the adapter again"
        ) from None

"""Module plumbing: orthora adapter layers that wrap a frozen base layer (PEFT's tuner-layer shape).

The math lives in :mod:`orthora.rotations`; this module only decides *where* a rotation is applied (before or after
the base layer, along which dimension) and how it is folded into the base weights on merge.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import rotations
from .config import OrthoConfig

BASE_ADAPTER_NAME = "__base__"  # in mixed batches: samples that use the base model


def layer_kind(module: nn.Module) -> Optional[str]:
    """The orthora layer family for a base module, or None when the type is unsupported."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


SUPPORTED_LAYERS = "torch.nn.Linear, transformers Conv1D (GPT-2), torch.nn.Conv2d and torch.nn.Embedding"


def feature_widths(module: nn.Module) -> tuple[Optional[int], int]:
    """(input width, output width) that an input-/output-side rotation acts on. Embeddings have no input width."""
    kind = layer_kind(module)
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d":
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out
    if kind == "conv2d":
        return module.in_channels, module.out_channels
    if kind == "embedding":
        return None, module.embedding_dim
    raise TypeError(f"unsupported layer type {type(module).__name__}; orthora supports {SUPPORTED_LAYERS}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_shape(width: int, config: OrthoConfig, where: str) -> tuple[int, int]:
    """(num_blocks, block_size) for a rotation of ``width`` features, or a ValueError naming the valid choices."""
    if config.block_size is not None:
        if width % config.block_size:
            raise ValueError(
                f"block_size={config.block_size} does not divide the {where} width {width}; "
                f"valid block sizes are the divisors of {width}: {_divisors(width)}"
            )
        return width // config.block_size, config.block_size
    if width % config.num_blocks:
        raise ValueError(
            f"num_blocks={config.num_blocks} does not divide the {where} width {width}; "
            f"valid numbers of blocks are the divisors of {width}: {_divisors(width)}"
        )
    return config.num_blocks, width // config.num_blocks


def check_layer(module: nn.Module, config: OrthoConfig) -> None:
    """Raise a ValueError/TypeError if ``config`` cannot be applied to ``module`` (nothing is changed)."""
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(
            f"unsupported layer type {type(module).__name__}; orthora supports {SUPPORTED_LAYERS}"
        )
    d_in, d_out = feature_widths(module)
    if kind == "embedding" and config.side != "output":
        raise ValueError(f"side={config.side!r} is not supported for nn.Embedding; use side='output'")
    if kind == "conv2d" and module.groups != 1:
        raise ValueError(
            f"grouped convolutions (groups={module.groups}) cannot be merged after a channel rotation; "
            "only groups=1 is supported"
        )
    if config.side in ("output", "both"):
        block_shape(d_out, config, "output")
    if config.side in ("input", "both"):
        block_shape(d_in, config, "input")


class BlockRotation(nn.Module):
    """One adapter's free parameters for one side of one layer, and the map to its orthogonal blocks.

    ``weight`` holds ``(k, b(b-1)/2)`` generator entries (``(k, r, b)`` reflection vectors for Householder), with
    ``k = 1`` when blocks share one rotation. The float32 blocks are cached while no autograd graph is needed
    (evaluation, generation) and recomputed when the parameters change.
    """

    def __init__(self, width: int, num_blocks: int, block_size: int, config: OrthoConfig) -> None:
        super().__init__()
        self.width = width
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.parametrization = config.parametrization
        self.neumann_terms = config.neumann_terms
        self.max_angle = config.max_angle
        self.module_dropout = config.module_dropout
        spec = config.parametrization_spec
        self.exact = spec.exact
        self.scale = config.scale_for(block_size)
        stored_blocks = 1 if config.block_share else num_blocks
        initialise = spec.identity_init if config.init_weights else spec.random_init
        self.weight = nn.Parameter(
            initialise(stored_blocks, block_size, config.num_reflections, scale=self.scale)
        )
        #: Householder rotations are built as their factors ``(U, C)`` (dense blocks are one product away) and
        #: rotate activations through them when that is cheaper (OrthoLayer.factor_policy)
        self.factored = not spec.uses_generator
        self.factored_is_cheaper = self.factored and rotations.factored_is_cheaper(
            block_size, config.num_reflections
        )
        self._cache: Optional[tuple[tuple, tuple[torch.Tensor, ...]]] = None
        self._step: Optional[_StepBlocks] = (
            None  # this rotation's slice of a batched build (build_step_blocks)
        )

    def extra_repr(self) -> str:
        shared = ", shared" if self.weight.shape[0] == 1 and self.num_blocks > 1 else ""
        return f"{self.num_blocks}x({self.block_size}x{self.block_size}), {self.parametrization}{shared}"

    def group_key(self) -> tuple:
        """Rotations with equal keys build their blocks in one batched call (see :func:`build_step_blocks`)."""
        w = self.weight
        return (
            self.parametrization,
            self.block_size,
            self.neumann_terms,
            self.max_angle,
            self.scale,
            w.dtype,
            w.device,
            tuple(w.shape[1:]),
        )

    def _weight_key(self) -> tuple:
        w = self.weight
        return (w._version, w.data_ptr(), w.device, w.dtype)

    def _build(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What this rotation builds from (possibly concatenated) parameters: ``(blocks,)``, or for Householder
        rotations their factors ``(U, C)`` (:func:`rotations.householder_factors`)."""
        if self.factored:
            return rotations.orthogonal_factors(params, compute_dtype=params.dtype)
        blocks = rotations.orthogonal_blocks(
            params,
            self.parametrization,
            self.block_size,
            neumann_terms=self.neumann_terms,
            max_angle=self.max_angle,
            compute_dtype=params.dtype,
            scale=self.scale,
        )
        return (blocks,)

    def _built(self) -> tuple[torch.Tensor, ...]:
        """This step's :meth:`_build`: from the batched build, the evaluation cache, or built here."""
        needs_graph = torch.is_grad_enabled() and self.weight.requires_grad
        key = self._weight_key()
        step = self._step
        if step is not None and step.key == key and (not needs_graph or step.graph_alive()):
            return step.built if needs_graph else tuple(t.detach() for t in step.built)
        if not needs_graph and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        outside = needs_graph and not torch.compiler.is_compiling()  # dynamo cannot trace saved-tensor hooks
        with saved_outside_checkpoints() if outside else contextlib.nullcontext():
            result = self._build(self.weight)
        self._cache = None if needs_graph else (key, result)
        return result

    def blocks(self) -> torch.Tensor:
        """The ``(k or 1, b, b)`` orthogonal blocks in float32 (float64 if the parameters are float64)."""
        built = self._built()
        return rotations.householder_from_factors(*built) if self.factored else built[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, C)`` with blocks ``I - U^T C``; only for Householder rotations (:attr:`factored`)."""
        if not self.factored:
            raise ValueError(
                f"{self.parametrization} rotations have no factors; only householder rotations do"
            )
        return self._built()

    def forward_blocks(self) -> torch.Tensor:
        """Blocks for a forward pass: with module dropout, each block is the identity with probability p."""
        blocks = self.blocks()
        if self.training and self.module_dropout > 0:
            blocks = blocks.expand(self.num_blocks, -1, -1)
            keep = torch.rand(self.num_blocks, 1, 1, device=blocks.device) >= self.module_dropout
            eye = torch.eye(self.block_size, dtype=blocks.dtype, device=blocks.device)
            blocks = torch.where(keep, blocks, eye)
        return blocks

    def inverse_blocks(self) -> torch.Tensor:
        with torch.no_grad():
            return rotations.invert_blocks(self.blocks(), self.exact)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def saved_outside_checkpoints() -> contextlib.AbstractContextManager:
    """Save what block construction needs for backward as usual, even inside a gradient-checkpointed region.

    Blocks are small (``k·b²`` numbers per layer), and non-reentrant checkpointing requires its recomputation to
    save exactly the tensors the forward saved: keeping construction out of it lets a layer take its blocks from a
    batched build in one pass and build them itself in the other.
    """
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


class _StepBlocks:
    """One rotation's slice of the blocks built for all rotations of a group in one batched call.

    It serves the layer's forward and, under gradient checkpointing, its recomputation (which must see the same
    tensors the forward saved). It is valid while the parameters are unchanged and until backward has passed
    through the batched build (its graph is then freed, so a later forward needs new blocks).
    """

    __slots__ = ("key", "built", "state")

    def __init__(self, key: tuple, built: tuple[torch.Tensor, ...], state: dict) -> None:
        self.key = key
        self.built = built  # see BlockRotation._build
        self.state = state  # shared by the group: {"alive": False} once backward has gone through the build

    def graph_alive(self) -> bool:
        return self.state["alive"]


def build_step_blocks(rotation_modules: list[BlockRotation]) -> None:
    """Build the blocks of every rotation sharing a :meth:`BlockRotation.group_key` in one batched call.

    Called once per PeftModel forward with autograd (by ``OrthoModel._enable_peft_forward_hooks``): one
    construction per (parametrization, block size, dtype, device) instead of one per layer, with the same blocks
    (every map acts on each block alone) and the same gradients (the concatenation's backward splits them). Each rotation keeps its slice for this step.
    """
    groups: dict[tuple, list[BlockRotation]] = {}
    for rotation in rotation_modules:
        if rotation.weight.requires_grad and type(rotation.weight.data) is torch.Tensor:
            groups.setdefault(rotation.group_key(), []).append(rotation)
    for members in groups.values():
        if len(members) < 2:
            for rotation in members:
                rotation._step = None
            continue
        built = members[0]._build(torch.cat([r.weight for r in members]))
        # every output's gradient reaches built[0] (the blocks, or the U that C comes from): its hook marks the end
        root = built[0]
        state = {"alive": root.requires_grad}
        if root.requires_grad:
            root.register_hook(lambda grad, state=state: state.update(alive=False))
        sizes = [r.weight.shape[0] for r in members]
        slices = zip(*(tensor.split(sizes) for tensor in built), strict=True)
        for rotation, parts in zip(members, slices, strict=True):
            rotation._step = _StepBlocks(rotation._weight_key(), parts, state)


class FeatureScale(nn.Module):
    """A learnable per-output-feature scale ``s`` (``OrthoConfig(magnitude=True)``), initialised to 1.

    It multiplies the layer's output after the rotation, ``y = s * R f(x)``, and merges into the weight rows. It
    lets an adapter change feature norms, which a rotation alone cannot.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class OrthoLayer(BaseTunerLayer):
    """Shared logic of all orthora layers: per-adapter rotations keyed by adapter name, as PEFT's layers do."""

    adapter_layer_names: tuple[str, ...] = ("ortho_out", "ortho_in", "ortho_magnitude")
    other_param_names: tuple[str, ...] = ()
    #: "auto": fold exact rotations into the frozen weight when that is cheaper (see rotations.folding_is_cheaper);
    #: "never": always rotate activations; "always": fold whenever possible (tests, benchmarks).
    fold_policy: str = "auto"
    #: "auto": Householder rotations rotate activations through their factors when that is cheaper
    #: (rotations.factored_is_cheaper); "always": whenever they are Householder; "never": through dense blocks.
    factor_policy: str = "auto"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ortho_out = nn.ModuleDict({})
        self.ortho_in = nn.ModuleDict({})
        self.ortho_magnitude = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kind = layer_kind(self.get_base_layer())
        self.in_features, self.out_features = feature_widths(self.get_base_layer())
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(
        self, adapter_name: str, config: OrthoConfig, inference_mode: bool = False, **kwargs: Any
    ) -> None:
        check_layer(self.get_base_layer(), config)
        if config.side in ("output", "both"):
            k, b = block_shape(self.out_features, config, "output")
            self.ortho_out[adapter_name] = BlockRotation(self.out_features, k, b, config)
        if config.side in ("input", "both"):
            k, b = block_shape(self.in_features, config, "input")
            self.ortho_in[adapter_name] = BlockRotation(self.in_features, k, b, config)
        if config.magnitude:
            self.ortho_magnitude[adapter_name] = FeatureScale(self.out_features)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _adapter_modules(self, adapter_name: str) -> list[nn.Module]:
        """Every module holding ``adapter_name``'s parameters in this layer (rotations and magnitude)."""
        tables = (self.ortho_out, self.ortho_in, self.ortho_magnitude)
        return [table[adapter_name] for table in tables if adapter_name in table]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """Move the adapter to the base layer's device only; its dtype is set by ``cast_adapter_dtype``.

        PEFT's version also casts to the base layer's dtype, which after a ``low_cpu_mem_usage`` load would leave
        the parameters in half precision whatever ``autocast_adapter_dtype`` says.
        """
        base = self.get_base_layer()
        target = device if device is not None else getattr(getattr(base, "weight", None), "device", None)
        if target is None:
            return
        for rotation in self._adapter_modules(adapter_name):
            if rotation.weight.device.type != "meta":
                rotation.to(target)

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's dtype contract: float32 parameters with ``autocast_adapter_dtype``, else the base layer's dtype.

        Either way the blocks are built in float32 from the parameters (see :meth:`BlockRotation.blocks`).
        """
        base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())[1]
        for rotation in self._adapter_modules(adapter_name):
            dtype = rotation.weight.dtype
            if autocast_adapter_dtype and dtype.is_floating_point and dtype.itemsize < 4:
                rotation.to(torch.float32)
            elif not autocast_adapter_dtype and base_dtype is not None and base_dtype.is_floating_point:
                rotation.to(base_dtype)

    def _rotations(self, name: str) -> tuple[BlockRotation | None, BlockRotation | None]:
        """(output-side, input-side) rotation of adapter ``name``; None where that side is not rotated."""
        return (
            self.ortho_out[name] if name in self.ortho_out else None,
            self.ortho_in[name] if name in self.ortho_in else None,
        )

    def _has_adapter(self, name: str) -> bool:
        return name in self.ortho_out or name in self.ortho_in or name in self.ortho_magnitude

    # ------------------------------------------------------------------------------------------------ forward
    def _applies_factored(self, rotation: BlockRotation) -> bool:
        """Whether ``rotation`` rotates activations through its Householder factors instead of dense blocks
        (module dropout replaces whole blocks, so it keeps the dense form)."""
        dropout = rotation.training and rotation.module_dropout > 0
        if not rotation.factored or dropout or self.factor_policy == "never":
            return False
        return self.factor_policy == "always" or rotation.factored_is_cheaper

    def _rotate_features(self, x: torch.Tensor, rotation: BlockRotation) -> torch.Tensor:
        channels_first = self.kind == "conv2d"  # rotate channels (dim 1)
        if channels_first:
            x = x.movedim(1, -1)
        if self._applies_factored(rotation):
            x = rotations.rotate_factored(x, *rotation.factors())
        else:
            x = rotations.rotate(x, rotation.forward_blocks(), exact=rotation.exact)
        return x.movedim(-1, 1) if channels_first else x

    def _apply_input(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        # input rotations compose in reverse so that the unmerged and merged forms agree (W' = W R_1 R_2 ...)
        for name in reversed(names):
            if name in self.ortho_in:
                rot = self.ortho_in[name]
                x = self._rotate_features(x, rot)
        return x

    def _apply_output(self, y: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            if name in self.ortho_out:
                rot = self.ortho_out[name]
                y = self._rotate_features(y, rot)
            if name in self.ortho_magnitude:
                y = self._scale_features(y, self.ortho_magnitude[name].weight)
        return y

    def _scale_features(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":  # channels are dim 1
            return y * scale.to(y.dtype).view(-1, 1, 1)
        return y * scale.to(y.dtype)

    def _acts_on_output(self, name: str) -> bool:
        return name in self.ortho_out or name in self.ortho_magnitude

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        names = self._unmerged_active_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs and self._should_fold(x, names):
            return self._folded_forward(x, names[0])
        result = self.base_layer(self._apply_input(x, names), *args, **kwargs)
        return self._apply_output(result, names)

    def _unmerged_active_adapters(self) -> list[str]:
        """Active adapters still to apply on top of the (possibly merged) base weights, in composition order.

        Merged adapters are already inside the weights, so they act first; that matches the unmerged result only if
        they come first in the active order too. Rotations do not commute, so any other mix is refused.
        """
        names = [a for a in self.active_adapters if self._has_adapter(a)]
        merged = [a for a in self.merged_adapters if a in names]
        if names[: len(merged)] != merged:
            raise ValueError(
                f"the active adapters {names} are merged as {merged}: merged adapters must be the first active "
                "adapters, in the same order, because rotations do not commute. Merge all active adapters "
                "(merge_adapter()) or unmerge them (unmerge_adapter()) first."
            )
        return names[len(merged) :]

    def _should_fold(self, x: torch.Tensor, names: list[str]) -> bool:
        if self.fold_policy == "never" or len(names) != 1 or self.kind not in ("linear", "conv1d"):
            return False
        base = self.get_base_layer()
        if type(base) not in (nn.Linear, Conv1D) or base.weight.requires_grad:
            return False  # quantized or otherwise special layers keep their own forward; trained weights too
        rots = [t[names[0]] for t in (self.ortho_out, self.ortho_in) if names[0] in t]
        if not all(r.exact for r in rots):
            return False
        if self.fold_policy == "always":
            return True
        out_rot, in_rot = self._rotations(names[0])

        def reflections(rot: BlockRotation | None) -> int | None:
            return rot.weight.shape[1] if rot is not None and self._applies_factored(rot) else None

        return rotations.folding_is_cheaper(
            x.numel() // x.shape[-1],
            self.in_features,
            self.out_features,
            out_rot.block_size if out_rot is not None else None,
            in_rot.block_size if in_rot is not None else None,
            reflections(out_rot),
            reflections(in_rot),
        )

    def _folded_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """One matmul with ``R_out W R_in`` (folded per call) instead of rotating activations."""
        base = self.get_base_layer()
        out_rot, in_rot = self._rotations(name)
        result = rotations.folded_linear(
            x,
            self._weight_out_in(base.weight),
            base.bias,
            out_rot.forward_blocks() if out_rot is not None else None,
            in_rot.forward_blocks() if in_rot is not None else None,
        )
        if name in self.ortho_magnitude:
            result = self._scale_features(result, self.ortho_magnitude[name].weight)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample of the batch uses its own adapter (``"__base__"`` = none), as PEFT's LoRA offers."""
        if self.merged:
            raise ValueError("cannot use adapter_names with merged adapters; unmerge them first")
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"got {len(adapter_names)} adapter names for a batch of {x.shape[0]} samples")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(i)
        index = {n: torch.tensor(ix, device=x.device) for n, ix in groups.items()}
        if any(n in self.ortho_in for n in groups):
            x = x.clone()
            for name, ix in index.items():
                if name in self.ortho_in:
                    x[ix] = self._apply_input(x[ix], [name]).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if any(self._acts_on_output(n) for n in groups):
            result = result.clone()
            for name, ix in index.items():
                if self._acts_on_output(name):
                    result[ix] = self._apply_output(result[ix], [name]).to(result.dtype)
        return result

    # -------------------------------------------------------------------------------------------------- merge
    def _weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight seen as (out, in, ...); GPT-2's Conv1D stores (in, out)."""
        return weight.T if self.kind == "conv1d" else weight

    def _fold(self, weight: torch.Tensor, bias: Optional[torch.Tensor], out_blocks, in_blocks):
        """Return (W', b') with blockdiag rotations folded in: W' = R_out W R_in, b' = R_out b (float32 math)."""
        if self.kind == "embedding":  # rows are embedding vectors; rotate each like an activation
            return rotations.rotate(weight, out_blocks, exact=False), None
        w = self._weight_out_in(weight)
        if in_blocks is not None:
            if self.kind == "conv2d":  # (o, i, kh, kw): rotate the input-channel dim
                w = w.permute(0, 2, 3, 1)
                shape = w.shape
                w = rotations.rotate_weight_columns(w.reshape(-1, shape[-1]), in_blocks).reshape(shape)
                w = w.permute(0, 3, 1, 2)
            else:
                w = rotations.rotate_weight_columns(w, in_blocks)
        if out_blocks is not None:
            w = rotations.rotate_weight_rows(w, out_blocks)
            if bias is not None:
                bias = rotations.rotate(bias, out_blocks, exact=False)
        return self._weight_out_in(w), bias

    def _scale_weight(
        self, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(diag(s) W, s * b)`` in the weight's storage layout: output features are rows of a Linear/Conv2d
        weight and columns of a Conv1D or Embedding weight."""
        scale = scale.detach().to(weight.dtype)
        if self.kind in ("conv1d", "embedding"):
            weight = weight * scale
        else:
            weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        return weight, None if bias is None else bias * scale.to(bias.dtype)

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            base.weight.data.copy_(weight.to(base.weight.dtype))
            if bias is not None and base.bias is not None:
                base.bias.data.copy_(bias.to(base.bias.dtype))

    def _base_float32(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        base = self.get_base_layer()
        bias = getattr(base, "bias", None)
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        return base.weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters' rotations into the base weights (the result is computed before anything is written)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight_dtype = self.get_base_layer().weight.dtype
        if adapter_names and not weight_dtype.is_floating_point:
            raise ValueError(
                f"cannot merge into {type(self.get_base_layer()).__name__} weights of dtype {weight_dtype} "
                "(quantized?); run the adapter unmerged or dequantize the base model first"
            )
        for name in adapter_names:
            if not self._has_adapter(name):
                continue
            with torch.no_grad():
                out_blocks, in_blocks = (r.blocks() if r is not None else None for r in self._rotations(name))
                weight, bias = self._base_float32()
                weight, bias = self._fold(weight, bias, out_blocks, in_blocks)
                if name in self.ortho_magnitude:
                    weight, bias = self._scale_weight(weight, bias, self.ortho_magnitude[name].weight)
            if safe_merge and not (
                torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
            ):
                raise ValueError(
                    f"NaNs detected in the merged weights; the adapter {name!r} seems to be broken"
                )
            self._write_base(weight, bias)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges in reverse order; for exact rotations the inverse is just the transpose."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self._undo_last_merge()

    def unmerge_one(self, name: str) -> None:
        """Undo the merge of adapter ``name`` only; adapters merged after it are undone and merged again."""
        if name not in self.merged_adapters:
            return
        later = self.merged_adapters[self.merged_adapters.index(name) + 1 :]
        while self._undo_last_merge() != name:
            pass
        if later:
            self.merge(adapter_names=later)

    def _undo_last_merge(self) -> str:
        name = self.merged_adapters[-1]
        if name in self.ortho_magnitude and (self.ortho_magnitude[name].weight.abs() < 1e-12).any():
            raise ValueError(
                f"cannot unmerge adapter {name!r}: its magnitude has entries at 0, so the merged weights lost those "
                "features' directions; reload the base model instead"
            )
        self.merged_adapters.pop()
        if self._has_adapter(name):
            out_inv, in_inv = (r.inverse_blocks() if r is not None else None for r in self._rotations(name))
            with torch.no_grad():
                weight, bias = self._base_float32()
                if name in self.ortho_magnitude:
                    weight, bias = self._scale_weight(weight, bias, 1 / self.ortho_magnitude[name].weight)
                weight, bias = self._fold(weight, bias, out_inv, in_inv)
            self._write_base(weight, bias)
        return name

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``W_merged - W`` for one adapter (for inspection; merging multiplies, it does not add)."""
        with torch.no_grad():
            out_blocks, in_blocks = (r.blocks() if r is not None else None for r in self._rotations(adapter))
            weight, bias = self._base_float32()
            merged, _ = self._fold(weight, bias, out_blocks, in_blocks)
            if adapter in self.ortho_magnitude:
                merged, _ = self._scale_weight(merged, None, self.ortho_magnitude[adapter].weight)
        return merged - weight

    # PEFT calls these for every method; rotations have no scale to change
    def set_scale(self, adapter: str, scale: float) -> None:
        if scale != 1:
            warnings.warn("orthora rotations have no scale; ignoring set_scale", stacklevel=2)

    def scale_layer(self, scale: float) -> None:
        if scale != 1:
            warnings.warn("orthora rotations have no scale; ignoring scale_layer", stacklevel=2)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        return None


class Linear(nn.Module, OrthoLayer):
    """orthora on ``nn.Linear`` and GPT-2's ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: OrthoConfig, **kwargs: Any) -> None:
        super().__init__()
        OrthoLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return OrthoLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "orthora." + super().__repr__()


class Conv2d(Linear):
    """orthora on ``nn.Conv2d``: rotates channels, so any kernel shape, stride or dilation works."""


class Embedding(Linear):
    """orthora on ``nn.Embedding``: rotates the embedding vectors (output side)."""


def layer_class_for(module: nn.Module) -> type[Linear]:
    kind = layer_kind(module)
    if kind in ("linear", "conv1d"):
        return Linear
    if kind == "conv2d":
        return Conv2d
    if kind == "embedding":
        return Embedding
    raise TypeError(f"unsupported layer type {type(module).__name__}; orthora supports {SUPPORTED_LAYERS}")

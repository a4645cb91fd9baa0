"""`OrthoModel`: the PEFT tuner that injects orthora layers into a model (PEFT's `BaseTuner` shape)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from . import _peft_compat
from .config import FORMAT_VERSION, OrthoConfig
from .layer import BASE_ADAPTER_NAME, OrthoLayer, build_step_blocks, check_layer, layer_class_for

MAX_REPORTED_PROBLEMS = 10


def _adapter_names_pre_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _orthora_layers(model: nn.Module):
    return ((key, module) for key, module in model.named_modules() if isinstance(module, OrthoLayer))


def _applied_rotations(model: nn.Module):
    """The rotations a forward pass of ``model`` applies: active, unmerged adapters of enabled layers."""
    for _, layer in _orthora_layers(model):
        if layer.disable_adapters:
            continue
        for name in layer.active_adapters:
            if name in layer.merged_adapters:
                continue
            for table in (layer.ortho_out, layer.ortho_in):
                if name in table:
                    yield table[name]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_adapter_name(name: Any) -> None:
    """Refuse a name the adapter's ``nn.ModuleDict`` tables cannot hold, before any layer is touched.

    torch rejects such keys deep inside ``update_layer`` ("attribute 'half' already exists"), half-way through
    wrapping the model; orthora says why up front.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if "." in name:
        raise ValueError(
            f"adapter_name {name!r} contains '.', which module names cannot; choose another name"
        )
    if name == BASE_ADAPTER_NAME:
        raise ValueError(f"adapter_name {name!r} is reserved for the base model in mixed batches")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(
            f"adapter_name {name!r} is the name of a torch.nn.Module attribute ({name!r}), so it cannot be a module "
            f"key; choose another name, e.g. {name + '_adapter'!r}"
        )


def discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove every trace of ``adapter_name`` from ``model``; layers left without adapters get their base back.

    Used to roll back a failed injection or load, so a failure leaves the model as it was. A merged adapter is
    unmerged first, so its rotation does not stay behind in the base weights.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, OrthoLayer):
                continue
            child.unmerge_one(adapter_name)
            for table in (getattr(child, table_name) for table_name in child.adapter_layer_names):
                if adapter_name in table:
                    del table[adapter_name]
            if not any(getattr(child, n) for n in child.adapter_layer_names) and not child.merged:
                setattr(parent, child_name, child.get_base_layer())
            elif adapter_name in child.active_adapters:
                remaining = sorted(set(child.ortho_out) | set(child.ortho_in))
                child._active_adapter = remaining[:1]
    _peft_compat.drop_modules_to_save(model, adapter_name)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)


class OrthoModel(BaseTuner):
    """Injects learnable block-diagonal orthogonal transforms into the targeted layers of a model.

    Users do not build it directly: ``get_peft_model(model, OrthoConfig(...))`` does, once ``orthora`` is imported.
    """

    prefix: str = "ortho_"
    tuner_layer_cls = OrthoLayer
    target_module_mapping = _peft_compat.default_target_modules()
    #: build the blocks of all layers that share (parametrization, block size, dtype, device) in one batched call
    #: per PeftModel forward with autograd (see layer.build_step_blocks). Off under torch.distributed, where FSDP/ZeRO-3
    #: gather each layer's parameters only when that layer runs.
    batch_block_construction: bool = True

    # ------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: OrthoConfig, model_config: dict) -> OrthoConfig:
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError(
                    f"OrthoConfig: no default target_modules for model_type={model_config.get('model_type')!r}; "
                    "pass target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')."
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _check_targets(self, model: nn.Module, config: OrthoConfig) -> None:
        """Validate every module that will be adapted before any of them is touched."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config = _peft_compat.expand_all_linear(config, model)
        problems: list[str] = []
        for key, module in model.named_modules():
            if (
                not key
                or ".base_layer" in key
                or any(f".{n}." in f".{key}." for n in OrthoLayer.adapter_layer_names)
            ):
                continue
            match = self._check_target_module_exists(config, key)
            if not match or _peft_compat.is_excluded(match):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(module, BaseTunerLayer) and not isinstance(module, OrthoLayer):
                problems.append(f"{key}: already wrapped by another PEFT method ({type(module).__name__})")
                continue
            try:
                check_layer(base, config)
            except (TypeError, ValueError) as err:
                problems.append(f"{key}: {err}")
        if problems:
            more = len(problems) - MAX_REPORTED_PROBLEMS
            listing = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS]) + (
                f"\n  ... and {more} more" if more > 0 else ""
            )
            raise ValueError(
                f"orthora cannot adapt {len(problems)} targeted module(s); nothing was changed:\n  {listing}"
            )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        check_adapter_name(adapter_name)
        existing = next((key for key, m in _orthora_layers(model) if m._has_adapter(adapter_name)), None)
        if existing is not None:
            raise ValueError(
                f"orthora adapter {adapter_name!r} already exists in {existing}; delete it first "
                "(delete_adapter) or choose another adapter_name"
            )
        if state_dict is None:
            self._check_targets(model, self.peft_config[adapter_name])
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException:
            discard_adapter(model, adapter_name)
            raise

    def _create_and_replace(
        self,
        config: OrthoConfig,
        adapter_name: str,
        target,
        target_name,
        parent,
        current_key=None,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, OrthoLayer):
            target.update_layer(adapter_name, config)
            return
        layer_cls = layer_class_for(target)
        new_module = layer_cls(target, adapter_name, config=config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # orthora layers already live on their base layer's device (see OrthoLayer.update_layer), so replacing a
        # module is a plain setattr; unlike BaseTuner's version it never copies weights onto heads without any
        setattr(parent, child_name, new_module)

    # -------------------------------------------------------------------------------------- mixed batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Per forward/generate call of the PeftModel: build the blocks of all layers in batched calls (when autograd
        is on), and route ``adapter_names=[...]`` (one per sample) to every orthora layer and modules_to_save copy."""
        if self.batch_block_construction and torch.is_grad_enabled() and not _distributed():
            build_step_blocks(list(_applied_rotations(self.model)))
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, OrthoLayer):
                known |= set(module.ortho_out) | set(module.ortho_in)
        unknown = {n for n in adapter_names if n != BASE_ADAPTER_NAME} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        per_row = list(adapter_names)
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats each sample num_beams times
            per_row = [n for n in adapter_names for _ in range(num_beams)]
        handles = []
        # the rotations, and each adapter's modules_to_save copies (its heads)
        routed = (OrthoLayer, AuxiliaryTrainingWrapper)
        for module in self.modules():
            if isinstance(module, routed):
                handles.append(
                    module.register_forward_pre_hook(
                        partial(_adapter_names_pre_hook, adapter_names=per_row), with_kwargs=True
                    )
                )
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if per_row != list(adapter_names) and encoder is not None and encoder is not self.model:
            for module in encoder.modules():  # the encoder still sees the un-repeated batch
                if isinstance(module, routed):
                    handles.append(
                        module.register_forward_pre_hook(
                            partial(_adapter_names_pre_hook, adapter_names=list(adapter_names)),
                            with_kwargs=True,
                        )
                    )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if getattr(config, "format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"adapter format version {config.format_version} is newer than this orthora supports "
                f"({FORMAT_VERSION}); upgrade orthora"
            )
        merged_in = [key for key, m in _orthora_layers(model) if adapter_name in m.merged_adapters]
        if merged_in:
            raise ValueError(
                f"orthora adapter {adapter_name!r} is merged (in {merged_in[0]} and {len(merged_in) - 1} more); "
                "loading new weights into it would make its unmerge undo the wrong rotation. Call "
                "unmerge_adapter() first."
            )
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = model.state_dict()
        problems = [
            f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            for key, value in remapped.items()
            if key in expected and tuple(value.shape) != tuple(expected[key].shape)
        ]
        if problems:
            discard_adapter(model, adapter_name)
            listing = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
            raise ValueError(
                f"orthora adapter {adapter_name!r} does not fit this base model ({len(problems)} tensor(s) with other "
                f"shapes; was it trained on a different architecture or with another block_size?). The model was left "
                f"as it was.\n  {listing}"
            )
        return remapped

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "geodesic",
    ) -> None:
        """New adapter from ``adapters`` and ``weights`` on the rotation group: ``"geodesic"`` (exp of the weighted
        sum of logs), ``"compose"`` (product in order) or ``"linear"`` (sum of parameters). See orthora.arithmetic."""
        from .arithmetic import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        if getattr(self.model, "quantization_method", None) == "gptq":
            raise ValueError("Cannot merge orthora layers when the model is gptq quantized")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT's generic cast only sees parameters keyed by adapter name; orthora's live inside BlockRotation modules
        for module in self.model.modules():
            if isinstance(module, OrthoLayer):
                module.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

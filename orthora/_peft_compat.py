"""Every touch of PEFT internals lives here.

PEFT's public ``register_peft_method`` refuses names outside its own ``PeftType`` enum, so an out-of-tree method
registers by filling the three method mappings PEFT dispatches through (config class, tuner class, key prefix).
PEFT 0.21 dispatches saving and loading through the tuner class, so a string ``peft_type`` round-trips.
"""

from __future__ import annotations

import peft
from packaging.version import Version


class _MethodName(str):
    """A plain string that also answers ``.value`` and ``.name`` like a ``PeftType`` member.

    PEFT's enum cannot be extended, and transformers' ``load_adapter`` reads ``peft_config.peft_type.value``.
    """

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


ORTHORA_PEFT_TYPE = _MethodName("ORTHORA")
MIN_PEFT = Version("0.21.0")


def check_peft_version() -> None:
    if Version(peft.__version__) < MIN_PEFT:
        raise ImportError(
            f"orthora needs peft>={MIN_PEFT} (its state-dict handling lets out-of-tree methods save and load); "
            f"found peft=={peft.__version__}. Run: pip install -U 'peft>={MIN_PEFT}'"
        )


def register(config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Make ``get_peft_model``, ``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` know orthora."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    PEFT_TYPE_TO_CONFIG_MAPPING[ORTHORA_PEFT_TYPE] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[ORTHORA_PEFT_TYPE] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[ORTHORA_PEFT_TYPE] = prefix


def default_target_modules() -> dict[str, list[str]]:
    """PEFT's per-architecture defaults for orthogonal methods, plus architectures it does not list."""
    from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

    mapping = {k: list(v) for k, v in TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING.items()}
    mapping.setdefault("distilbert", ["q_lin", "v_lin"])
    mapping.setdefault("vit", ["query", "value"])
    mapping.setdefault("mbart", ["q_proj", "v_proj"])
    mapping.setdefault("marian", ["q_proj", "v_proj"])
    return mapping


def expand_all_linear(config, model):
    """Resolve target_modules='all-linear' the way PEFT's injection will."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(config, model)


def is_excluded(match) -> bool:
    """PEFT marks modules removed by exclude_modules with a private sentinel type."""
    from peft.tuners.tuners_utils import _ExcludedModule

    return isinstance(match, _ExcludedModule)


def route_push_to_hub(push) -> None:
    """Send ``PeftModel.push_to_hub`` of models holding an orthora adapter through ``push``.

    The inherited transformers ``push_to_hub`` replaces the card with a generic transformers one (no
    ``import orthora``, no settings); other PEFT methods keep PEFT's own behaviour.
    """
    import functools

    from peft import PeftModel

    inherited = PeftModel.push_to_hub
    if getattr(inherited, "_orthora_route", False):
        return

    @functools.wraps(inherited)
    def push_to_hub(self, repo_id: str, **kwargs):
        configs = getattr(self, "peft_config", {}) or {}
        if any(str(c.peft_type) == str(ORTHORA_PEFT_TYPE) for c in configs.values()):
            return push(self, repo_id, **kwargs)
        return inherited(self, repo_id, **kwargs)

    push_to_hub._orthora_route = True
    PeftModel.push_to_hub = push_to_hub


def drop_modules_to_save(model, adapter_name: str) -> None:
    """Remove ``adapter_name``'s copies of ``modules_to_save`` (e.g. a trained head), unwrapping modules left with
    none, so a failed load leaves the base model as it was (PEFT wraps them before it reads any weight)."""
    from peft.utils.other import ModulesToSaveWrapper

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, ModulesToSaveWrapper) or adapter_name not in child.modules_to_save:
                continue
            del child.modules_to_save[adapter_name]
            if not child.modules_to_save:
                setattr(parent, child_name, child.original_module)
            elif adapter_name in child.active_adapters:
                child.set_adapter([next(iter(child.modules_to_save))])

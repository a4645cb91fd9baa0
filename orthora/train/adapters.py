"""The adapter method is a config choice: orthora, or any PEFT method, built from the same ``adapter:`` mapping."""

from __future__ import annotations

import dataclasses
from typing import Any

from peft import PeftConfig

from .config import ConfigError

#: Methods this project documents and tests as baselines; any other PEFT method name also works.
DOCUMENTED_PEFT_METHODS = ("lora", "oft", "boft", "hra", "ia3", "loha", "lokr", "vera", "adalora")


def adapter_config_class(method: str) -> type[PeftConfig]:
    """The config class of ``method``: `orthora.OrthoConfig` or the PEFT class registered under that name."""
    if method.lower() == "orthora":
        try:
            import orthora
        except Exception as err:  # noqa: BLE001 - report any import failure as one line
            raise ConfigError(
                f"method 'orthora' is unavailable: import orthora failed ({type(err).__name__}: {err})"
            ) from None
        return orthora.OrthoConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for peft_type, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if str(getattr(peft_type, "value", peft_type)).lower() == method.lower():
            return config_class
    raise ConfigError(
        f"unknown method {method!r}; use 'orthora' or a PEFT method such as {', '.join(DOCUMENTED_PEFT_METHODS)}"
    )


def build_adapter_config(method: str, adapter_kwargs: dict[str, Any], task_type: str) -> PeftConfig:
    """Instantiate the adapter config, naming any argument the method does not have."""
    config_class = adapter_config_class(method)
    valid = {f.name for f in dataclasses.fields(config_class) if f.init}
    for key in adapter_kwargs:
        if key not in valid or key in ("peft_type", "task_type"):
            raise ConfigError(
                f"adapter key {key!r} is not an argument of {config_class.__name__} (method {method!r})"
            )
    try:
        return config_class(task_type=task_type, **adapter_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter ({method}): {err}") from None

"""Share adapters through the Hugging Face Hub: an orthora model card, push, pull, and one-line errors.

PEFT's generic push uploads transformers' generic card, which never says that ``import orthora`` is needed to read
``peft_type: ORTHORA``. Here the card is written with huggingface_hub's `ModelCard`/`ModelCardData` from what is
actually pushed (the adapter folder, and the training run's ``results.json`` when there was one), and every Hub
failure a user can cause (wrong token, missing repo or revision, a broken download) becomes one `HubError` line.
``import orthora`` routes ``PeftModel.push_to_hub`` of orthora models through `push_peft_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import (
    CommitInfo,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    snapshot_download,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftConfig
from safetensors import safe_open

from ._peft_compat import ORTHORA_PEFT_TYPE

try:  # the HTTP client under huggingface_hub: httpx2 from 2.x, httpx in 1.x
    from httpx2 import HTTPError as _TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import HTTPError as _TransportError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
#: Files an adapter folder may hold (the engine also saves the tokenizer beside the adapter).
ADAPTER_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", CARD_FILE]
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class HubError(ValueError):
    """A Hub operation failed for a reason the user can fix (token, repo id, revision, network, base model)."""


#: PEFT task type -> (pipeline tag, PEFT auto class, transformers auto class); one table for card and loader.
TASK_CLASSES: dict[str, tuple[str, str, str]] = {
    "SEQ_CLS": (
        "text-classification",
        "AutoPeftModelForSequenceClassification",
        "AutoModelForSequenceClassification",
    ),
    "CAUSAL_LM": ("text-generation", "AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM"),
    "TOKEN_CLS": (
        "token-classification",
        "AutoPeftModelForTokenClassification",
        "AutoModelForTokenClassification",
    ),
    "QUESTION_ANS": (
        "question-answering",
        "AutoPeftModelForQuestionAnswering",
        "AutoModelForQuestionAnswering",
    ),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoPeftModelForFeatureExtraction", "AutoModel"),
}
_NO_TASK = (None, "AutoPeftModel", "AutoModel")


# ------------------------------------------------------------------------------------------------------------------
# One-line errors
# ------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, action: str = "reach") -> Iterator[None]:
    """Turn huggingface_hub/httpx failures inside the block into a one-line `HubError` naming repo and revision."""
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        yield
    except RevisionNotFoundError:
        raise HubError(f"revision {revision or 'main'!r} does not exist in Hub repo {repo_id!r}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"Hub repo {repo_id!r} not found (check the id; a private repo also needs a token that can read it)"
        ) from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        reason = (
            "offline (HF_HUB_OFFLINE=1)"
            if constants.is_offline_mode()
            else f"the Hub is unreachable ({_first_line(err)})"
        )
        raise HubError(f"cannot {action} {where}: {reason} and it is not in the local cache") from None
    except EntryNotFoundError as err:
        raise HubError(f"{where} has no file {_missing_file(err)}: is it an adapter repo?") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubError(
                f"the Hub rejected the token (401) for {where}: check HF_TOKEN or --token"
            ) from None
        if status == 403:
            raise HubError(f"the token may not write to Hub repo {repo_id!r} (403 Forbidden)") from None
        raise HubError(f"cannot {action} {where}: {_first_line(err)}") from None
    except (_TransportError, ConnectionError, TimeoutError) as err:
        raise HubError(f"network failure while trying to {action} {where}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _missing_file(err: BaseException) -> str:
    match = re.search(r"/resolve/[^/]+/(\S+?)\.?$", str(err), re.MULTILINE)
    return repr(match.group(1)) if match else "that was asked for"


# ------------------------------------------------------------------------------------------------------------------
# The model card
# ------------------------------------------------------------------------------------------------------------------
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Use it

orthora registers its method with PEFT when imported, so `import orthora` must come before loading
(PEFT alone cannot read `peft_type: ORTHORA`).

```bash
pip install orthora
```

```python
{{ snippet }}
```

## Method and settings

{{ settings }}

## Trainable parameters

{{ parameters }}

## Evaluation

{{ evaluation }}

## Framework versions

{{ versions }}
"""


def is_hub_id(name: str | None) -> bool:
    """True for ``user/name`` style ids that are not also local folders (a local path must not go on a public card)."""
    return bool(name) and _HUB_ID.fullmatch(name) is not None and not os.path.exists(name)


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubError(f"{os.fspath(folder)!r} is not an adapter folder (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as err:
        raise HubError(f"{path} is not valid JSON: {err}") from None


def stored_parameters(folder: str | os.PathLike) -> dict[str, int]:
    """Parameters per tensor in the adapter's safetensors file (what the adapter adds to its base model)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise HubError(f"{os.fspath(folder)!r} has no {ADAPTER_WEIGHTS}")
    counts = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            count = 1
            for size in shape:
                count *= size
            counts[key] = count
    return counts


def method_settings(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The method's own settings: every adapter-config key that PEFT's base config does not define."""
    generic = {f.name for f in dataclasses.fields(PeftConfig)}
    return {k: v for k, v in adapter_config.items() if k not in generic and not k.startswith("_")}


def _results_of_pushed_adapter(results: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Metrics of the adapter that is pushed: the best evaluation when one was tracked, else the last."""
    best_step = (results.get("best") or {}).get("step")
    for entry in results.get("history") or []:
        if best_step is not None and entry.get("step") == best_step:
            return entry, best_step
    last = results.get("metrics") or {}
    return last, last.get("step")


def _dataset_of(results: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """(Hub data set id or None, its config, a readable name) of the run's evaluation data."""
    config = results.get("config") or {}
    if config.get("validation_file"):
        return None, None, f"local file {Path(config['validation_file']).name}"
    name, subset = config.get("dataset_name"), config.get("dataset_config_name")
    if not name:
        try:
            from .train.config import TrainConfig
            from .train.recipes import get_recipe

            values = {k: v for k, v in config.items() if k not in ("hub_token",)}
            name, default_subset = get_recipe(TrainConfig(**values)).hub_dataset()
            subset = subset or default_subset
        except Exception:  # noqa: BLE001 - an old or foreign results.json: the card just names no data set
            return None, None, "the run's evaluation data"
    return name, subset, name + (f" ({subset})" if subset else "")


def build_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    results: dict[str, Any] | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The card of the adapter saved in ``folder``; ``results`` is the training engine's results.json content."""
    import peft
    import transformers

    import orthora

    adapter_config = read_adapter_config(folder)
    peft_type = str(adapter_config.get("peft_type"))
    is_orthora = peft_type == str(ORTHORA_PEFT_TYPE)
    task_type = adapter_config.get("task_type")
    pipeline_tag, auto_peft, _ = TASK_CLASSES.get(task_type, _NO_TASK)
    base = base_model or adapter_config.get("base_model_name_or_path")
    hub_base = base if is_hub_id(base) else None
    counts = stored_parameters(folder)
    total = sum(counts.values())
    settings = method_settings(adapter_config)
    name = repo_id or "your-name/this-adapter"

    extra_tags = tags
    tags = ["peft", "orthora" if is_orthora else peft_type.lower(), "orthogonal-finetuning"]
    if hub_base:
        tags.append(f"base_model:adapter:{hub_base}")
    tags += [tag for tag in extra_tags or [] if tag not in tags]
    datasets, metric_names, eval_results = None, None, None
    evaluation = "No evaluation was recorded: this adapter was pushed without a training run's results."
    if results:
        metrics, step = _results_of_pushed_adapter(results)
        hub_data, subset, data_name = _dataset_of(results)
        splits = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        rows, eval_results = [], []
        before = results.get("initial_metrics") or {}
        for split, values in splits.items():
            for metric, value in values.items():
                if metric == "runtime_s" or not isinstance(value, (int, float)):
                    continue
                was = (before.get(split) or {}).get(metric)
                rows.append(
                    f"| {split} | {metric} | {value:.4f} | " + (f"{was:.4f} |" if was is not None else "– |")
                )
                eval_results.append(
                    EvalResult(
                        task_type=pipeline_tag or "other",
                        dataset_type=hub_data or "custom",
                        dataset_name=data_name,
                        dataset_config=subset,
                        dataset_split=split,
                        metric_type=metric,
                        metric_value=float(value),
                    )
                )
        metric_names = sorted({r.metric_type for r in eval_results}) or None
        datasets = [hub_data] if hub_data else None
        config = results.get("config") or {}
        evaluation = (
            f"On {data_name}, after {results.get('completed_steps')} optimizer steps "
            f"(the pushed adapter is the one evaluated at step {step}):\n\n"
            "| split | metric | value | before training |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"Training: {results.get('train_examples')} examples, learning rate {config.get('learning_rate')}, "
            f"{config.get('num_train_epochs')} epoch(s), batch {config.get('per_device_train_batch_size')} per "
            f"process × {results.get('num_processes')} process(es), seed {config.get('seed')}; "
            f"{results.get('train_time_s', 0):.0f} s of training."
        )
        eval_results = eval_results or None

    card_data = ModelCardData(
        library_name="peft",
        base_model=hub_base,
        tags=tags,
        pipeline_tag=pipeline_tag,
        datasets=datasets,
        metrics=metric_names,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    if is_orthora:
        summary = (
            "An orthora adapter (`pip install orthora`): learned, exactly orthogonal block-diagonal "
            "rotations of the representations of the targeted layers, stored as a PEFT adapter. After "
            "`merge_and_unload()` the model is a plain transformers model with the base model's size and speed."
        )
    else:
        summary = f"A PEFT {peft_type} adapter trained with orthora's training engine."
    base_line = (
        f"Base model: [{hub_base}](https://huggingface.co/{hub_base})."
        if hub_base
        else f"Base model: a local checkpoint (`{Path(str(base)).name}`); load it yourself and use `PeftModel`."
    )
    base_expr = repr(hub_base) if hub_base else '"path/to/the/base/model"'
    imports = "import orthora  # registers the orthora method with PEFT\n" if is_orthora else ""
    if hub_base:
        snippet = (
            f"{imports}from peft import {auto_peft}\n\n"
            f'model = {auto_peft}.from_pretrained("{name}")  # also builds the base model {hub_base}'
        )
    else:
        _, _, auto_model = TASK_CLASSES.get(task_type, _NO_TASK)
        snippet = (
            f"{imports}from peft import PeftModel\nfrom transformers import {auto_model}\n\n"
            f"base = {auto_model}.from_pretrained({base_expr})\n"
            f'model = PeftModel.from_pretrained(base, "{name}")'
        )
    snippet += "\nmerged = model.merge_and_unload()  # optional: a plain transformers model, same outputs"
    setting_rows = "\n".join(
        f"| `{k}` | `{json.dumps(v, default=str)}` |" for k, v in sorted(settings.items())
    )
    settings_text = (
        f"{base_line}\n\nMethod `{peft_type}`, task type `{task_type}`.\n\n"
        f"| setting | value |\n|---|---|\n{setting_rows}"
    )
    modules = sorted({key.rsplit(".", 2)[0] for key in counts})
    parameters = (
        f"{total:,} parameters in `{ADAPTER_WEIGHTS}` ({len(counts)} tensors over {len(modules)} modules"
        + (", including the trained task head" if adapter_config.get("modules_to_save") else "")
        + ")."
    )
    versions = f"- orthora {orthora.__version__}\n- PEFT {peft.__version__}\n- transformers {transformers.__version__}"
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=f"{name.split('/')[-1]}: {'an orthora' if is_orthora else 'a ' + peft_type} adapter",
        summary=summary,
        snippet=snippet,
        settings=settings_text,
        parameters=parameters,
        evaluation=evaluation,
        versions=versions,
    )


def find_results(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The training engine's results.json in ``folder`` or its parent (the engine saves ``run/adapter``)."""
    for candidate in (Path(folder) / RESULTS_FILE, Path(folder).parent / RESULTS_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return None
    return None


# ------------------------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------------------------
def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    results: dict[str, Any] | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a saved adapter folder and an orthora card in one commit (the repo and branch are created if needed).

    ``results`` defaults to a results.json found beside the folder; ``base_model`` (a Hub id) replaces a local
    ``base_model_name_or_path`` in the pushed copy, so the adapter loads anywhere.
    """
    folder = Path(folder)
    adapter_config = read_adapter_config(folder)
    stored_parameters(folder)
    if results is None:
        results = find_results(folder)
    if base_model is not None and not is_hub_id(base_model):
        raise HubError(f"base_model must be a Hub id such as user/name, got {base_model!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="orthora-push-") as staging:
        for item in folder.iterdir():
            if item.name.startswith(".") or item.name == RESULTS_FILE:
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, Path(staging) / item.name)
        if base_model is not None:
            adapter_config["base_model_name_or_path"] = base_model
            (Path(staging) / ADAPTER_CONFIG).write_text(
                json.dumps(adapter_config, indent=2), encoding="utf-8"
            )
        card = build_model_card(staging, repo_id=repo_id, results=results, base_model=base_model, tags=tags)
        card.save(Path(staging) / CARD_FILE)
        with hub_errors(repo_id, revision, action="push to"):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None and not revision.startswith("refs/pr"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message or "Upload orthora adapter",
                commit_description=commit_description,
                create_pr=create_pr,
            )


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """Fail early (before a training run) if the token is missing, rejected, or cannot write under the namespace.

    Returns the user name the token belongs to.
    """
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise HubError(
            f"pushing to {repo_id!r} needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass a token"
        )
    with hub_errors(repo_id, action="push to"):
        user = HfApi(token=token).whoami()
    namespace = repo_id.split("/")[0] if "/" in repo_id else user["name"]
    allowed = [user["name"], *(org.get("name") for org in user.get("orgs") or [])]
    if namespace not in allowed:
        raise HubError(f"the token belongs to {user['name']!r}, which cannot push under {namespace!r}")
    return user["name"]


def push_peft_model(model: PeftModel, repo_id: str, **kwargs: Any) -> CommitInfo:
    """``PeftModel.push_to_hub`` for models with an orthora adapter: save, write the orthora card, upload.

    Accepts transformers' push_to_hub keywords (``token``, ``private``, ``revision``, ``commit_message``,
    ``commit_description``, ``create_pr``, ``max_shard_size``, ``tags``) plus ``results`` and ``base_model``.
    """
    kwargs.pop("max_shard_size", None)  # adapters are small: one file
    kwargs.pop("safe_serialization", None)
    with tempfile.TemporaryDirectory(prefix="orthora-save-") as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return push_adapter_folder(folder, repo_id, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Pull
# ------------------------------------------------------------------------------------------------------------------
def download_adapter(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """A local folder holding the adapter: ``source`` itself, or its snapshot in huggingface_hub's cache.

    Works offline (``HF_HUB_OFFLINE=1``) once cached. A failed download leaves no partial file in the cache.
    """
    if os.path.isdir(source):
        read_adapter_config(source)
        return os.fspath(source)
    repo_id = os.fspath(source)
    if not is_hub_id(repo_id):
        raise HubError(f"{repo_id!r} is neither an adapter folder nor a Hub id (user/name)")
    # huggingface_hub downloads into a temporary file and deletes it when the download fails
    with hub_errors(repo_id, revision, action="download"):
        folder = snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=ADAPTER_PATTERNS
        )
    if not (Path(folder) / ADAPTER_CONFIG).is_file():
        raise HubError(f"Hub repo {repo_id!r} has no {ADAPTER_CONFIG}: is it an adapter repo?")
    return folder


def attach_adapter(
    base_model: PreTrainedModel,
    source: str | os.PathLike,
    *,
    adapter_name: str = "default",
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = False,
) -> PeftModel:
    """``PeftModel.from_pretrained(base_model, source)`` from a folder or Hub id, with one-line errors.

    An adapter trained for another base model raises `HubError` and leaves ``base_model`` as it was.
    """
    from peft import PeftModel

    import orthora  # noqa: F401 - registers the method before PEFT reads the config

    folder = download_adapter(source, revision=revision, token=token)
    trained_on = read_adapter_config(folder).get("base_model_name_or_path")
    problem = adapter_fit_problem(base_model, folder)
    if problem is None:
        try:
            return PeftModel.from_pretrained(
                base_model, folder, adapter_name=adapter_name, is_trainable=is_trainable
            )
        except (ValueError, RuntimeError, KeyError) as err:
            problem = _first_line(err)
    raise HubError(
        f"adapter {os.fspath(source)!r} does not fit this base model (it was trained on {trained_on!r}): {problem}"
    )


def adapter_fit_problem(base_model: PreTrainedModel, folder: str | os.PathLike) -> str | None:
    """Why the adapter in ``folder`` cannot load onto ``base_model``, or None; decided on a meta-device copy.

    PEFT wraps the base model's layers and heads before it reads the weights, so a mismatch found while loading
    would leave the model changed; building the same adapter on a weightless skeleton first leaves it untouched.
    """
    import torch
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = PeftConfig.from_pretrained(os.fspath(folder))
    config.inference_mode = True
    try:
        with torch.device("meta"):
            skeleton = type(base_model)(base_model.config)
    except Exception:  # noqa: BLE001 - not a plain transformers model: PEFT's own checks will have to do
        return None
    try:
        with warnings.catch_warnings():  # the skeleton has no name_or_path; PEFT warns about renaming it
            warnings.simplefilter("ignore")
            adapted = get_peft_model(skeleton, config)
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(adapted).items()}
    except (ValueError, TypeError, KeyError) as err:
        return _first_line(err)
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    prefix = "base_model.model."
    problems = [
        f"{key.removeprefix(prefix)} is {shape} in the adapter but {expected[key]} in the model"
        if key in expected
        else f"the model has no {key.removeprefix(prefix)}"
        for key, shape in stored.items()
        if expected.get(key) != shape
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def load_pretrained(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    base_model: str | None = None,
    is_trainable: bool = False,
    **model_kwargs: Any,
) -> PeftModel:
    """Build the base model named by the adapter's ``base_model_name_or_path`` (or ``base_model``), then attach it.

    ``model_kwargs`` go to the transformers auto class's ``from_pretrained`` (e.g. ``num_labels=3``).
    """
    import transformers

    folder = download_adapter(source, revision=revision, token=token)
    adapter_config = read_adapter_config(folder)
    name = base_model or adapter_config.get("base_model_name_or_path")
    if not name:
        raise HubError(f"adapter {os.fspath(source)!r} names no base model; pass base_model=")
    _, _, auto_name = TASK_CLASSES.get(adapter_config.get("task_type"), _NO_TASK)
    auto_class = getattr(transformers, auto_name)
    try:
        with hub_errors(name, action="download the base model"):
            base = auto_class.from_pretrained(name, **model_kwargs)
    except OSError as err:
        raise HubError(
            f"cannot load base model {name!r} for adapter {os.fspath(source)!r}: {_first_line(err)}"
        ) from None
    return attach_adapter(base, folder, is_trainable=is_trainable)

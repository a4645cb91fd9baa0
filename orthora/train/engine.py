"""The one training engine: an accelerate loop shared by every task recipe.

Modelled on transformers' ``examples/pytorch/*_no_trainer.py`` scripts. The recipe says what differs between tasks
(data, head, preprocessing, prediction, metric); this module does the rest: validation of the inputs before any
step, accelerate setup, the optimisation loop with accumulation, clipping, warmup and mixed precision, periodic
evaluation with best-adapter tracking, resumable checkpoints, trackers, and atomic writing of every output. The
parts with a job of their own live beside it: `data` (raw data), `checkpoints` (checkpoint folders and resume),
`nonfinite` (NaN/Inf guards) and `atomic_files` (atomic writes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, get_scheduler

from .adapters import build_adapter_config
from .atomic_files import replace_dir_atomic, write_json_atomic, write_text_atomic
from .checkpoints import check_checkpoint_tensors, checkpoint_folders, publish_checkpoint, resolve_resume_dir
from .config import ConfigError, TrainConfig
from .data import check_data_files, load_raw_data
from .nonfinite import check_finite_before_saving, handle_nonfinite, nonfinite_problem
from .optim import parameter_groups
from .recipes import get_recipe
from .recipes.base import EvalSet, TaskRecipe

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
MERGED_DIR = "merged_model"
RESULTS_FILE = "results.json"


@dataclass
class TrainingProgress:
    """Loop state saved in every checkpoint (next to model, optimizer, scheduler and RNG states)."""

    completed_steps: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"state_json": json.dumps(self.__dict__)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(json.loads(state["state_json"]))


# ------------------------------------------------------------------------------------------------------------------
# Setup helpers
# ------------------------------------------------------------------------------------------------------------------
def load_model_config(config: TrainConfig, recipe: TaskRecipe):
    try:
        return AutoConfig.from_pretrained(
            config.model_name_or_path,
            trust_remote_code=config.trust_remote_code,
            **recipe.model_config_overrides(),
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"cannot load model {config.model_name_or_path!r}: {first_line}") from None


def load_tokenizer(config: TrainConfig):
    name = config.tokenizer_name or config.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"cannot load tokenizer {name!r}: {first_line}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak accelerator memory when on GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """Scalar-only view of the config for trackers (TensorBoard hparams reject lists, dicts and None)."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = item if isinstance(item, (int, float, str, bool)) else str(item)
    return flat


def concat_padded(chunks: list[np.ndarray], pad_value: float) -> np.ndarray:
    """Concatenate per-batch arrays whose second dimension differs, padding with ``pad_value``."""
    if chunks[0].ndim == 1:
        return np.concatenate(chunks)
    width = max(chunk.shape[1] for chunk in chunks)
    padded = [
        np.pad(c, [(0, 0), (0, width - c.shape[1])] + [(0, 0)] * (c.ndim - 2), constant_values=pad_value)
        for c in chunks
    ]
    return np.concatenate(padded)


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
class _Run:
    """State of one `run()`; split into methods only to keep each step readable."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)

    # --- everything that can fail on bad input, before any weight is loaded or any step taken ----------------
    def validate_inputs(self) -> None:
        config = self.config
        self.recipe = get_recipe(config)
        names = self.recipe.metric_names()
        if config.metric_for_best_model and config.metric_for_best_model not in names:
            raise ConfigError(
                f"metric_for_best_model {config.metric_for_best_model!r} is not reported by this task; "
                f"choose one of {', '.join(names)}"
            )
        self.peft_config = build_adapter_config(config.method, config.adapter, self.recipe.peft_task_type)
        check_data_files(config)
        self.resume_dir = resolve_resume_dir(config)
        self.model_config = load_model_config(config, self.recipe)
        self.recipe.check_model_config(self.model_config)
        self.tokenizer = load_tokenizer(config)
        self.recipe.check_tokenizer(self.tokenizer)
        if config.push_to_hub:
            check_hub_access(config)

    def setup_accelerator(self) -> None:
        config = self.config
        trackers = None if config.report_to in ("none", "", None) else config.report_to
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not _has_accelerator_device():
            raise ConfigError(  # accelerate's FSDP plugin refuses CPU-only machines with a traceback
                "the accelerate config asks for FSDP, but accelerate applies its FSDP plugin only on accelerator "
                "devices (GPU, XPU, NPU, ...); on CPU use configs/accelerate/cpu_ddp.yaml (see docs/training.md)"
            )
        self.accelerator = Accelerator(
            cpu=_needs_cpu_data_parallel(),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=trackers,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise ConfigError(
                f"{launched} processes were launched but accelerate runs each alone; "
                "on CPU set ACCELERATE_USE_CPU=1 (see docs/training.md)"
            )
        if config.save_merged_model and self.accelerator.distributed_type in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        ):
            raise ConfigError(
                "save_merged_model is not supported under FSDP/DeepSpeed; merge the saved adapter afterwards"
            )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
        logging.getLogger("orthora").setLevel(
            logging.INFO if self.accelerator.is_main_process else logging.WARNING
        )
        if not self.accelerator.is_local_main_process:
            datasets.utils.logging.set_verbosity_error()
        set_seed(config.seed)

    def prepare_data(self) -> None:
        config, recipe, accelerator = self.config, self.recipe, self.accelerator
        with accelerator.main_process_first():
            raw_train, raw_evals = load_raw_data(config, recipe)
            self.train_dataset = recipe.preprocess_train(raw_train, self.tokenizer)
            self.eval_sets: list[EvalSet] = [
                recipe.preprocess_eval(name, rows, self.tokenizer) for name, rows in raw_evals.items()
            ]
        if len(self.train_dataset) == 0:
            raise ConfigError("the training data is empty after preprocessing")

    def build_model(self) -> None:
        model = self.recipe.load_model(self.model_config)
        try:
            self.model = get_peft_model(model, self.peft_config)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(
                f"adapter {self.config.method!r} cannot be applied to this model: {err}"
            ) from None
        self.trainable_params, self.total_params = count_parameters(self.model)
        if self.trainable_params == 0:
            raise ConfigError("the adapter left no trainable parameter (check adapter.target_modules)")

    def build_loaders_and_optimizer(self) -> None:
        config, accelerator = self.config, self.accelerator
        pad_to = 8 if accelerator.mixed_precision in ("fp16", "bf16") else None
        collate = self.recipe.collator(self.tokenizer, self.model, pad_to)
        # A private generator keeps the loader's seeding off the global RNG, so a resumed run replays dropout exactly.
        generator = torch.Generator().manual_seed(config.seed)
        train_loader = DataLoader(
            self.train_dataset,
            shuffle=True,
            collate_fn=collate,
            batch_size=config.per_device_train_batch_size,
            generator=generator,
        )
        eval_loaders = [
            DataLoader(s.model_inputs, collate_fn=collate, batch_size=config.per_device_eval_batch_size)
            for s in self.eval_sets
        ]
        optimizer = torch.optim.AdamW(
            parameter_groups(
                self.model, weight_decay=config.weight_decay, head_learning_rate=config.head_learning_rate
            ),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        self.model, self.optimizer, self.train_loader, *self.eval_loaders = accelerator.prepare(
            self.model, optimizer, train_loader, *eval_loaders
        )
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps)
        self.max_steps = config.max_train_steps or config.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        warmup = (
            config.num_warmup_steps
            if config.num_warmup_steps is not None
            else math.ceil(config.warmup_ratio * self.max_steps)
        )
        # The prepared scheduler steps once per process per optimizer step, hence the factor.
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=warmup * accelerator.num_processes,
            num_training_steps=self.max_steps * accelerator.num_processes,
        )
        self.scheduler = accelerator.prepare(scheduler)
        self.progress = TrainingProgress()
        accelerator.register_for_checkpointing(self.progress)
        self._register_adapter_only_checkpoints()
        self.trainable = {
            n: p for n, p in accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad
        }

    def _register_adapter_only_checkpoints(self) -> None:
        """Checkpoints hold only the trainable weights: the frozen base model is reloaded from its source."""
        trainable = {
            n for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad
        }

        def keep_trainable(models: list, weights: list[dict], output_dir: str) -> None:
            for i, state in enumerate(weights):
                weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable}

        self.accelerator.register_save_state_pre_hook(keep_trainable)

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        accelerator, recipe = self.accelerator, self.recipe
        self.model.eval()
        results: dict[str, dict[str, float]] = {}
        for eval_set, loader in zip(self.eval_sets, self.eval_loaders, strict=True):
            collected: dict[str, list[np.ndarray]] = defaultdict(list)
            pads: dict[str, float] = {}
            started = time.perf_counter()
            for batch in tqdm(
                loader,
                desc=f"eval {eval_set.name}",
                leave=False,
                disable=not accelerator.is_local_main_process,
            ):
                with torch.no_grad():
                    outputs = recipe.predict(self.model, batch, accelerator)
                tensors = {}
                for key, (tensor, pad_value) in outputs.items():
                    pads[key] = pad_value
                    if tensor.dim() > 1:
                        tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value)
                    tensors[key] = tensor
                gathered = accelerator.gather_for_metrics(tensors)
                for key, tensor in gathered.items():
                    collected[key].append(
                        tensor.float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
                    )
            arrays = {key: concat_padded(chunks, pads[key]) for key, chunks in collected.items()}
            metrics = recipe.compute_metrics(eval_set, arrays)
            metrics["runtime_s"] = round(time.perf_counter() - started, 3)
            results[eval_set.name] = metrics
        self.model.train()
        return results

    def track(self, metrics: dict[str, dict[str, float]], epoch: int) -> None:
        """Record an evaluation, log it, and save the adapter when the tracked metric improves."""
        progress, accelerator = self.progress, self.accelerator
        step = progress.completed_steps
        progress.last_eval_step = step
        progress.history.append({"step": step, "epoch": epoch, **metrics})
        accelerator.log(
            {f"eval/{split}/{k}": v for split, m in metrics.items() for k, v in m.items()}, step=step
        )
        accelerator.print(f"step {step}: " + "; ".join(f"{s}: {_fmt(m)}" for s, m in metrics.items()))
        summary = self.diagnostics_summary()
        if summary:
            accelerator.log({f"diagnostics/{k}": v for k, v in summary.items()}, step=step)
        value = metrics[self.eval_sets[0].name].get(self.metric_name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        improved = progress.best_metric is None or (
            value > progress.best_metric if self.greater_is_better else value < progress.best_metric
        )
        if improved:
            progress.best_metric, progress.best_step = float(value), step
            self.save_adapter(self.output_dir / BEST_ADAPTER_DIR)

    def diagnostics_summary(self) -> dict[str, float]:
        """orthora.diagnostics' whole-model numbers (angles, weight change, hyperspherical energy) for the trackers.

        Main process only; layers wider than 1024 neurons get a sampled energy. Empty, with a note printed once, where
        they cannot be computed (sharded parameters, a PEFT method without a report).
        """
        from .. import diagnostics

        accelerator = self.accelerator
        if not accelerator.is_main_process or getattr(self, "_diagnostics_unavailable", False):
            return {}
        reason = None
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            reason = "parameters are sharded under FSDP/DeepSpeed"
        else:
            try:
                rows = diagnostics.layer_report(accelerator.unwrap_model(self.model), max_neurons=1024)
            except TypeError as err:
                reason = str(err)
        if reason is not None:
            self._diagnostics_unavailable = True
            accelerator.print(f"diagnostics are not logged: {reason}")
            return {}
        summary = diagnostics.model_summary(rows)
        return {
            k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    # --- saving ----------------------------------------------------------------------------------------------------
    def save_adapter(self, directory: Path) -> None:
        accelerator = self.accelerator
        check_finite_before_saving(self.trainable, f"adapter {directory.name}", self.progress.completed_steps)
        state_dict = accelerator.get_state_dict(
            self.model
        )  # collective under FSDP/DeepSpeed: all ranks call it
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.model)

            def write(tmp: str) -> None:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)

            replace_dir_atomic(directory, write)
        accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        accelerator, config = self.accelerator, self.config
        step = self.progress.completed_steps
        tmp, final = checkpoint_folders(self.output_dir, step)
        check_finite_before_saving(self.trainable, f"checkpoint {final.name}", step)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_checkpoint(tmp, final, step, config.checkpoints_total_limit)
            if config.push_to_hub and config.hub_strategy == "checkpoint":
                self.push_best_adapter(self.partial_results())
        accelerator.wait_for_everyone()

    def partial_results(self) -> dict[str, Any]:
        """What a card can say about a run that is still going (the history and best step so far)."""
        progress = self.progress
        return {
            "completed_steps": progress.completed_steps,
            "history": progress.history,
            "metrics": progress.history[-1] if progress.history else {},
            "best": {"metric": self.metric_name, "value": progress.best_metric, "step": progress.best_step},
            "train_examples": len(self.train_dataset),
            "num_processes": self.accelerator.num_processes,
            "config": self.config.to_dict(),
        }

    def push_best_adapter(self, results: dict[str, Any]) -> str:
        """Push the best adapter so far (else the last saved one) with its card; main process only."""
        from orthora.hub import HubError, push_adapter_folder

        config = self.config
        folder = self.output_dir / BEST_ADAPTER_DIR
        if not folder.is_dir():
            folder = self.output_dir / ADAPTER_DIR
        if not folder.is_dir():
            logger.info("push_to_hub: no adapter saved yet at step %d", self.progress.completed_steps)
            return ""
        try:
            commit = push_adapter_folder(
                folder,
                config.hub_model_id,
                token=config.hub_token,
                private=config.hub_private_repo,
                revision=config.hub_revision,
                commit_message=f"orthora adapter, step {self.progress.completed_steps}",
                results=results,
            )
        except HubError as err:
            raise ConfigError(f"push to the Hub failed: {err}") from None
        logger.info("pushed %s to %s", folder.name, commit.commit_url)
        return commit.commit_url

    # --- the loop ----------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        config, accelerator, progress = self.config, self.accelerator, self.progress
        self.metric_name, self.greater_is_better = self.recipe.metric_to_track()
        if config.metric_for_best_model:
            self.metric_name, self.greater_is_better = config.metric_for_best_model, True
        accelerator.init_trackers("orthora", config=flat_hparams(config))

        initial_metrics = None
        if config.eval_before_training and self.resume_dir is None:
            initial_metrics = self.evaluate()
            accelerator.print(
                "before training: " + "; ".join(f"{s}: {_fmt(m)}" for s, m in initial_metrics.items())
            )

        resumed_from = 0
        if self.resume_dir is not None:
            check_checkpoint_tensors(self.resume_dir, self.trainable)
            accelerator.load_state(str(self.resume_dir), strict=False)
            resumed_from = progress.completed_steps
            accelerator.print(f"resumed from {self.resume_dir} at step {resumed_from}")
        starting_epoch = progress.completed_steps // self.steps_per_epoch
        batches_to_skip = (
            progress.completed_steps - starting_epoch * self.steps_per_epoch
        ) * config.gradient_accumulation_steps

        total_batch = (
            config.per_device_train_batch_size
            * accelerator.num_processes
            * config.gradient_accumulation_steps
        )
        accelerator.print(
            f"training {self.trainable_params:,} of {self.total_params:,} parameters ({config.method}); "
            f"{len(self.train_dataset)} examples, {self.max_steps} steps, total batch {total_batch}"
        )
        bar = tqdm(
            total=self.max_steps,
            initial=progress.completed_steps,
            desc="train",
            disable=not accelerator.is_local_main_process,
        )
        self.model.train()
        train_started = time.perf_counter()
        samples_seen = 0
        running_loss = torch.zeros((), device=accelerator.device)
        loss_count = 0
        window_loss = torch.zeros((), device=accelerator.device)  # the micro-batches of one optimizer step
        window_count = 0
        epoch = starting_epoch
        for epoch in range(starting_epoch, self.num_epochs):
            if progress.completed_steps >= self.max_steps:
                break
            self.train_loader.set_epoch(epoch)
            loader = self.train_loader
            if epoch == starting_epoch and batches_to_skip:
                loader = accelerator.skip_first_batches(self.train_loader, batches_to_skip)
            for batch in loader:
                with accelerator.accumulate(self.model):
                    loss = self.model(**batch).loss
                    accelerator.backward(loss)
                    window_loss += loss.detach().float()
                    window_count += 1
                    problem = (
                        nonfinite_problem(
                            accelerator,
                            self.model,
                            self.trainable,
                            window_loss,
                            batch,
                            progress.completed_steps + 1,
                        )
                        if accelerator.sync_gradients
                        else None
                    )
                    if problem is None:
                        if accelerator.sync_gradients and config.max_grad_norm:
                            accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                        self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                samples_seen += _batch_size(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                if problem is None:
                    running_loss += window_loss
                    loss_count += window_count
                else:
                    handle_nonfinite(problem, config.on_nonfinite)
                    progress.skipped_steps.append(progress.completed_steps + 1)
                window_loss.zero_()
                window_count = 0
                progress.completed_steps += 1
                bar.update(1)
                step = progress.completed_steps
                if step % config.logging_steps == 0:
                    mean_loss = accelerator.reduce(running_loss / loss_count, "mean").item()
                    accelerator.log(
                        {"train/loss": mean_loss, "train/learning_rate": self.scheduler.get_last_lr()[0]},
                        step=step,
                    )
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    running_loss.zero_()
                    loss_count = 0
                if config.eval_steps and step % config.eval_steps == 0:
                    self.track(self.evaluate(), epoch)
                if isinstance(config.checkpointing_steps, int) and step % config.checkpointing_steps == 0:
                    self.save_checkpoint()
                if step >= self.max_steps:
                    break
            if config.eval_steps is None and progress.last_eval_step != progress.completed_steps:
                self.track(self.evaluate(), epoch)
            if config.checkpointing_steps == "epoch":
                self.save_checkpoint()
        bar.close()
        train_time = time.perf_counter() - train_started
        if progress.last_eval_step != progress.completed_steps:
            self.track(self.evaluate(), epoch)

        self.save_adapter(self.output_dir / ADAPTER_DIR)
        memory, memory_kind = peak_memory_mb(accelerator.device)
        return {
            "task": config.task,
            "task_name": config.task_name,
            "method": config.method,
            "model_name_or_path": config.model_name_or_path,
            "metrics": progress.history[-1] if progress.history else {},
            "initial_metrics": initial_metrics,
            "best": {"metric": self.metric_name, "value": progress.best_metric, "step": progress.best_step},
            "history": progress.history,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": 100.0 * self.trainable_params / self.total_params,
            "completed_steps": progress.completed_steps,
            "skipped_steps": progress.skipped_steps,
            "resumed_from_step": resumed_from,
            "train_examples": len(self.train_dataset),
            "train_time_s": train_time,
            "train_samples_per_s": samples_seen / train_time if train_time > 0 else None,
            "peak_memory_mb": memory,
            "peak_memory_kind": memory_kind,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "adapter_dir": str(self.output_dir / ADAPTER_DIR),
            "best_adapter_dir": str(self.output_dir / BEST_ADAPTER_DIR)
            if progress.best_step is not None
            else None,
            "versions": _versions(),
            "config": config.to_dict(),
        }

    def finish(self, results: dict[str, Any]) -> None:
        config, accelerator = self.config, self.accelerator
        if config.save_merged_model:
            if accelerator.is_main_process:
                merged = accelerator.unwrap_model(self.model).merge_and_unload()

                def write(tmp: str) -> None:
                    merged.save_pretrained(tmp, safe_serialization=True)
                    self.tokenizer.save_pretrained(tmp)

                replace_dir_atomic(self.output_dir / MERGED_DIR, write)
                results["merged_model_dir"] = str(self.output_dir / MERGED_DIR)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(self.output_dir / RESULTS_FILE, results)
            if config.push_to_hub:  # after results.json, so a failed push loses nothing
                results["hub_commit_url"] = self.push_best_adapter(results)
                write_json_atomic(self.output_dir / RESULTS_FILE, results)
        accelerator.wait_for_everyone()
        accelerator.end_training()


def check_hub_access(config: TrainConfig) -> None:
    """A missing or rejected Hub token is a config error, found before any weight is loaded."""
    from orthora.hub import HubError, check_push_access

    try:
        check_push_access(config.hub_model_id, config.hub_token)
    except HubError as err:
        raise ConfigError(f"push_to_hub: {err}") from None


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "runtime_s"
    )


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


def _needs_cpu_data_parallel() -> bool:
    """True when several processes were launched (accelerate launch --multi_gpu, torchrun) on a machine with no
    accelerator device: accelerate would then run every process alone, so ask it for CPU (gloo) data parallelism."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator_device()


def _has_accelerator_device() -> bool:
    """Whether torch or accelerate sees a GPU or another accelerator device."""
    if torch.cuda.is_available():
        return True
    import accelerate.utils as accelerate_utils

    probes = (
        "is_xpu_available",
        "is_npu_available",
        "is_mlu_available",
        "is_musa_available",
        "is_hpu_available",
        "is_sdaa_available",
        "is_neuron_available",
    )
    return any(getattr(accelerate_utils, name, lambda: False)() for name in probes)


def _release_process_state(accelerator: Accelerator | None) -> None:
    """Let a later `run()` in the same Python process pick other accelerate settings (single-process only)."""
    if accelerator is not None and accelerator.distributed_type == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run(config: TrainConfig) -> dict[str, Any]:
    """Fine-tune as ``config`` says; return the results dict (also written to ``output_dir/results.json``).

    Bad input (config, data files, columns, model/task mismatch) raises `ConfigError` before training starts.
    """
    wall_started = time.perf_counter()
    job = _Run(config)
    job.validate_inputs()
    job.accelerator = None
    try:
        job.setup_accelerator()
        if job.accelerator.is_main_process:
            os.makedirs(config.output_dir, exist_ok=True)
            _write_config_atomic(config, Path(config.output_dir) / "train_config.yaml")
        job.prepare_data()
        job.build_model()
        job.build_loaders_and_optimizer()
        results = job.train()
        results["wall_time_s"] = time.perf_counter() - wall_started
        job.finish(results)
        return results
    finally:
        _release_process_state(job.accelerator)


def evaluate_adapter(
    config: TrainConfig, adapter: str, *, revision: str | None = None, token: str | None = None
) -> dict[str, dict[str, float]]:
    """Evaluate a saved adapter (a folder or a Hub id) on ``config``'s evaluation data, without training.

    ``config.adapter``/``config.method`` are ignored: the adapter's own saved config is used.
    """
    from orthora.hub import HubError, attach_adapter, download_adapter

    job = _Run(config)
    job.validate_inputs()
    try:
        folder = download_adapter(adapter, revision=revision, token=token)
    except HubError as err:
        raise ConfigError(str(err)) from None
    job.accelerator = None
    try:
        job.setup_accelerator()
        job.prepare_data()
        try:  # trainable only so the shared loader/optimizer set-up has parameters; no step is taken
            job.model = attach_adapter(job.recipe.load_model(job.model_config), folder, is_trainable=True)
        except HubError as err:
            raise ConfigError(str(err)) from None
        job.build_loaders_and_optimizer()
        return job.evaluate()
    finally:
        _release_process_state(job.accelerator)


def _write_config_atomic(config: TrainConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

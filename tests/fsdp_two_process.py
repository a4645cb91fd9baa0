"""orthora under FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU/gloo: train, gather, save, resume.

Run by tests/test_train_fsdp.py as ``torchrun --nproc_per_node 2 tests/fsdp_two_process.py OUT [--resume]``;
`train` is also the single-process reference (``fsdp=False``). Every step trains on the same global batch of 4
sequences; with FSDP each of the 2 ranks takes 2 of them, and FSDP averages the gradients, which equals the
full-batch mean because every sequence has the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import peft
import torch
from tiny_models import VOCAB, _llama

import orthora

GLOBAL_BATCH, LENGTH, STEPS, SAVE_AT = 4, 24, 4, 2
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def adapter_config() -> orthora.OrthoConfig:
    return orthora.OrthoConfig(target_modules=TARGETS, block_size=16, side="both", magnitude=False)


def build(fsdp: bool):
    torch.manual_seed(0)
    model = peft.get_peft_model(_llama(), adapter_config())
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(100 + step))
    per_rank = GLOBAL_BATCH // world
    return ids[rank * per_rank : (rank + 1) * per_rank]


def train(out: Path, *, fsdp: bool, resume: bool = False) -> None:
    """Train to STEPS (from the SAVE_AT checkpoint when ``resume``), checkpoint at SAVE_AT, save the adapter."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    rank, world = (dist.get_rank(), dist.get_world_size()) if fsdp else (0, 1)
    model, optimizer = build(fsdp)
    if (
        fsdp and rank == 0 and not resume
    ):  # what FSDP2 shards: (global shape, this rank's shape) per parameter
        shapes = {n: [list(p.shape), list(p.to_local().shape)] for n, p in model.named_parameters()}
        out.mkdir(parents=True, exist_ok=True)
        (out / "shards.json").write_text(json.dumps(shapes))
    start = 0
    if resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(out / "checkpoint"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = SAVE_AT
    for step in range(start, STEPS):
        ids = batch(step, rank, world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == SAVE_AT and not resume and fsdp:  # sharded checkpoint: every rank writes its shards
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / "checkpoint"))
    # the full adapter, gathered from the shards (collective: every rank calls it), written by rank 0
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out / ("adapter-resumed" if resume else "adapter")), state_dict=full)
    if fsdp:
        dist.barrier()


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        train(args.out, fsdp=True, resume=args.resume)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

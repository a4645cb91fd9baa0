"""Mixed-adapter batches route each row to its adapter's own classifier head (PEFT's modules_to_save), not only
to its rotations: found while writing docs/usage.md, where "__base__" rows used the active adapter's trained head."""

from __future__ import annotations

import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_bert

from orthora import OrthoConfig


def test_mixed_batch_uses_each_adapters_own_head():
    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, 12))
    base = tiny_bert()
    with torch.no_grad():
        reference = base(input_ids=input_ids).logits
    config = OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=16)
    model = get_peft_model(base, config)
    model.add_adapter(
        "second", OrthoConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=8)
    )
    with torch.no_grad():  # give each adapter its own rotations and its own head
        for name, param in model.named_parameters():
            if ".default." in name or ".second." in name:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    with torch.no_grad():
        per_adapter = {}
        for adapter in ("default", "second"):
            model.set_adapter(adapter)
            per_adapter[adapter] = model(input_ids=input_ids).logits
        model.set_adapter("default")
        mixed = model(input_ids=input_ids, adapter_names=["default", "second", "__base__", "second"]).logits
    assert (per_adapter["default"] - per_adapter["second"]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], per_adapter["default"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], per_adapter["second"][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], reference[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[3], per_adapter["second"][3], atol=1e-5, rtol=0)

"""Property-based configs: every combination either works (orthogonal, identity at init, exact merge) or is refused
with an error naming the bad value, before any weight is touched."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from orthora import OrthoConfig, rotations
from orthora.layer import BlockRotation, OrthoLayer
from orthora.rotations import NEUMANN_MAX_NORM, PARAMETRIZATIONS

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@st.composite
def cases(draw):
    use_num_blocks = draw(st.booleans())
    shape = draw(st.integers(1, 12))
    return {
        "d_in": draw(st.integers(1, 24)),
        "d_out": draw(st.integers(1, 24)),
        "bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from(list(TOLERANCE))),
        "autocast_adapter_dtype": draw(st.booleans()),
        "config": {
            "side": draw(st.sampled_from(["output", "input", "both"])),
            "parametrization": draw(st.sampled_from(sorted(PARAMETRIZATIONS))),
            "block_share": draw(st.booleans()),
            "num_reflections": draw(st.integers(1, 4)),
            "max_angle": draw(st.one_of(st.none(), st.floats(-1.0, 4.0), st.just(math.nan))),
            # drawn, not left to the defaults, so the property covers both whatever the default config is
            "generator_scale": draw(st.sampled_from([1.0, "auto"])),
            "magnitude": draw(st.booleans()),
            **({"num_blocks": shape} if use_num_blocks else {"block_size": shape}),
        },
    }


def expected_problems(case) -> list[str]:
    """The rules of the docs, written out independently of the code: the values that must be refused."""
    config = case["config"]
    spec = PARAMETRIZATIONS[config["parametrization"]]
    problems = []
    if config["max_angle"] is not None and not (config["max_angle"] > 0 and spec.uses_generator):
        problems.append("max_angle")
    if not spec.uses_generator and config["num_reflections"] % 2:
        problems.append("num_reflections")
    key = "num_blocks" if "num_blocks" in config else "block_size"
    widths = {"output": [case["d_out"]], "input": [case["d_in"]], "both": [case["d_out"], case["d_in"]]}
    if any(width % config[key] for width in widths[config["side"]]):
        problems.append(key)
    return problems


def base_model(case) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(case["d_in"], case["d_out"], bias=case["bias"])).to(case["dtype"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_config_works_or_is_refused_before_any_weight_is_touched(case):
    model = base_model(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problems = expected_problems(case)
    try:
        config = OrthoConfig(target_modules=["0"], **case["config"])
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=case["autocast_adapter_dtype"])
    except (ValueError, TypeError) as err:
        assert problems, f"valid config refused: {err}"
        assert any(p in str(err) for p in problems), f"error names none of {problems}: {err}"
        assert not any(isinstance(m, OrthoLayer) for m in model.modules())
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        return
    assert not problems, f"config with a bad {problems} was accepted"

    dtype, tol = case["dtype"], TOLERANCE[case["dtype"]]
    x = torch.randn(5, case["d_in"], generator=torch.Generator().manual_seed(1)).to(dtype)
    with peft_model.disable_adapter():
        reference = peft_model(x).float()
    torch.testing.assert_close(peft_model(x).float(), reference, atol=tol, rtol=0)  # identity at init

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: every block away from the identity
        for rotation in (m for m in peft_model.modules() if isinstance(m, BlockRotation)):
            # divided by the generator scale: the same rotation at every scale
            noise = torch.randn(rotation.weight.shape, generator=g) / rotation.scale
            rotation.weight.add_(noise.to(rotation.weight.dtype))
            blocks = rotation.blocks()
            assert blocks.dtype == torch.float32
            error = rotations.orthogonality_error(blocks).item()
            bound = 1e-5 if rotation.exact else 2 * NEUMANN_MAX_NORM**5 + NEUMANN_MAX_NORM**10
            assert error <= bound and math.isfinite(error)
    adapted = peft_model(x).float()
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(x).float(), adapted, atol=tol * 10, rtol=tol)  # exact merge
    peft_model.unmerge_adapter()
    for key, value in before.items():
        restored = peft_model.get_base_model().state_dict()[key.replace("0.", "0.base_layer.", 1)]
        torch.testing.assert_close(restored.float(), value.float(), atol=tol * 10, rtol=tol)

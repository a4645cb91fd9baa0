"""The folded fast path (rotations folded into the frozen weight) has the true gradient, not just a plausible one."""

import pytest
import torch

from orthora import rotations
from orthora.rotations import PARAMETRIZATIONS

EXACT = sorted(name for name, spec in PARAMETRIZATIONS.items() if spec.exact)


def params_for(parametrization, num_blocks, block_size, seed):
    spec = PARAMETRIZATIONS[parametrization]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.param_shape(num_blocks, block_size, 2), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("parametrization", EXACT)
@pytest.mark.parametrize("side", ["output", "input", "both"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_block", "shared"])
def test_gradcheck_of_folded_linear(parametrization, side, bias, shared):
    d_in, d_out, block_size = 6, 9, 3
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)  # frozen: no gradient by design
    b = torch.randn(d_out, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    x = torch.randn(2, 4, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    p_out = params_for(parametrization, 1 if shared else d_out // block_size, block_size, 1).requires_grad_()
    p_in = params_for(parametrization, 1 if shared else d_in // block_size, block_size, 2).requires_grad_()

    def blocks(p):
        return rotations.orthogonal_blocks(p, parametrization, block_size, compute_dtype=torch.float64)

    def folded(x, b, p_out, p_in):
        out_blocks = blocks(p_out) if side in ("output", "both") else None
        in_blocks = blocks(p_in) if side in ("input", "both") else None
        return rotations.folded_linear(x, weight, b, out_blocks, in_blocks)

    def reference(x, b, p_out, p_in):
        h = rotations.rotate(x, blocks(p_in), exact=False) if side in ("input", "both") else x
        z = torch.nn.functional.linear(h, weight, b)
        return rotations.rotate(z, blocks(p_out), exact=False) if side in ("output", "both") else z

    inputs = (x, b, p_out, p_in)
    torch.testing.assert_close(folded(*inputs), reference(*inputs), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(folded, inputs)

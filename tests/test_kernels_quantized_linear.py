"""Weight-only quantized linears: error within the documented bound, memory saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels import QuantizedLinear, load_blocks, module_nbytes, quantize_linears_, write_tiny_checkpoint
from kernels.quantized_linear import QUANTIZED_KINDS, bound_output_error


@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_error_is_within_the_bound(kind, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80).to(dtype)  # 96 inputs: blocks of 64 straddle weight rows
    layer = QuantizedLinear(linear, kind)
    x = torch.randn(5, 7, 96).to(dtype)
    with torch.no_grad():
        exact = x.float() @ linear.weight.float().T + linear.bias.float()
        got = layer(x.float())
    assert got.shape == (5, 7, 80)
    error = (got - exact).abs()
    assert torch.all(error <= bound_output_error(layer, x) + 1e-4)
    assert layer(x).dtype == dtype


@pytest.mark.parametrize("kind,max_ratio", [("int8", 0.27), ("nf4", 0.145), ("int4", 0.145)])
def test_quantized_block_is_smaller_and_still_close(tmp_path, kind, max_ratio):
    write_tiny_checkpoint(tmp_path, num_layers=2, hidden_size=128)
    span = load_blocks(tmp_path, 0, 2)
    hidden = torch.randn(2, 6, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = span(hidden)
        before = module_nbytes(span.blocks[0])
        quantize_linears_(span, kind)
        after = module_nbytes(span.blocks[0])
        cache = span.allocate_cache(2, 8)
        got = span(hidden, cache)
    assert all(isinstance(m, QuantizedLinear) for m in span.blocks[1].mlp.children())
    assert after < max_ratio * before, (before, after)
    relative = (got - expected).norm() / expected.norm()
    assert relative < {"int8": 0.03, "nf4": 0.25, "int4": 0.35}[kind]

"""Fast quantization paths against the plain-torch reference, and the error bounds."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import quantize as q
from kernels import quantize_cpu

BOUNDS = {"int8": 1 / 254, "int4": 1 / 14, "nf4": 0.1520}  # the module docstring's table
needs_library = pytest.mark.skipif(quantize_cpu.load_library() is None, reason="no C compiler here")


def _inputs(numel: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 3
    return x.to(dtype)


def _assert_fast_equals_reference(x: torch.Tensor, block_size: int) -> None:
    codes, scales = q.quantize_blockwise_int8(x, block_size)
    ref_codes, ref_scales = q.quantize_blockwise_int8_reference(x, block_size)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(q.dequantize_blockwise_int8(codes, scales, block_size, dtype),
                           q.dequantize_blockwise_int8_reference(codes, scales, block_size, dtype))  # fmt: skip
    for kind in ("nf4", "int4"):
        packed, scales = q.quantize_blockwise_4bit(x, block_size, kind)
        ref_packed, ref_scales = q.quantize_blockwise_4bit_reference(x, block_size, kind)
        assert torch.equal(packed, ref_packed) and torch.equal(scales, ref_scales), kind
        for dtype in (torch.float32, torch.float16):
            got = q.dequantize_blockwise_4bit(packed, scales, x.numel(), block_size, kind, dtype)
            want = q.dequantize_blockwise_4bit_reference(packed, scales, x.numel(), block_size, kind, dtype)
            assert torch.equal(got, want), kind


@needs_library
@pytest.mark.parametrize("numel", [0, 1, 2, 63, 64, 65, 1001, 300_001, 1 << 19])
@pytest.mark.parametrize("block_size", [2, 64, 96, 1024])
def test_cpu_fast_path_is_bit_identical_to_reference(numel, block_size):
    _assert_fast_equals_reference(_inputs(numel), block_size)


@needs_library
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    _assert_fast_equals_reference(_inputs(300_007, dtype), 64)
    _assert_fast_equals_reference(_inputs(4096, dtype).view(64, 64).t(), 64)  # non-contiguous


@needs_library
def test_zeros_ties_and_extremes():
    zeros = torch.zeros(1000)
    codes, scales = q.quantize_blockwise_int8(zeros)
    assert not codes.any() and not scales.any()
    # Exact halves (x * 127 / absmax = k + 0.5) round half to even, like torch.round.
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5] * 8)
    _assert_fast_equals_reference(ties, 64)
    _assert_fast_equals_reference(torch.tensor([1e-38, -3e38, 1e30, 0.0] * 50), 64)


@needs_library
@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=0, max_size=700),
    block_size=st.sampled_from([2, 4, 64, 66, 256]),
)
def test_fast_path_matches_reference_on_arbitrary_values(values, block_size):
    _assert_fast_equals_reference(torch.tensor(values, dtype=torch.float32), block_size)


@pytest.mark.parametrize("kind", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_bounds_hold(kind, dtype):
    x = _inputs(100_003, dtype, seed=3).float()
    x[:64] = 0.0  # an all-zero block decodes to exact zeros
    x[1000:1064] = torch.linspace(-1, 1, 64)  # covers every gap of the 4-bit code books
    if kind == "int8":
        codes, scales = q.quantize_blockwise_int8(x, 64)
        decoded = q.dequantize_blockwise_int8(codes, scales, 64)
    else:
        packed, scales = q.quantize_blockwise_4bit(x, 64, kind)
        decoded = q.dequantize_blockwise_4bit(packed, scales, x.numel(), 64, kind)
    absmax = scales.repeat_interleave(64)[: x.numel()]
    error = (decoded - x).abs()
    assert torch.all(error <= BOUNDS[kind] * absmax * (1 + 1e-5) + 1e-12)
    assert torch.all(decoded[:64] == 0)
    assert error.max() > 0.5 * BOUNDS[kind] * absmax.min()  # the bound is not vacuous


def test_contract_validation():
    with pytest.raises(ValueError, match="block_size"):
        q.quantize_blockwise_int8(torch.ones(4), block_size=3)
    with pytest.raises(ValueError, match="unknown 4-bit kind"):
        q.quantize_blockwise_4bit(torch.ones(4), kind="fp4")
    with pytest.raises(ValueError, match="scales"):
        q.dequantize_blockwise_int8(torch.zeros(130, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="packed bytes"):
        q.dequantize_blockwise_4bit(torch.zeros(3, dtype=torch.uint8), torch.ones(1), numel=9)


def test_failed_build_falls_back_to_reference_with_a_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SWARM_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quantize_cpu, "_library", None)
    monkeypatch.setattr(quantize_cpu, "_load_failed", False)
    with caplog.at_level(logging.WARNING, logger="kernels.quantize_cpu"):
        x = _inputs(1000)
        codes, scales = q.quantize_blockwise_int8(x)
    assert "torch path" in caplog.text
    assert quantize_cpu._library is None
    ref_codes, ref_scales = q.quantize_blockwise_int8_reference(x)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


def test_library_builds_into_a_fresh_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(quantize_cpu, "_library", None)
    monkeypatch.setattr(quantize_cpu, "_load_failed", False)
    library = quantize_cpu.load_library()
    if library is None:
        pytest.skip("no C compiler here")
    assert list(tmp_path.glob("swarm_quantize_*.so"))
    _assert_fast_equals_reference(_inputs(5000), 64)


def _triton_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from kernels import quantize_triton

    return quantize_triton.is_available()


@pytest.mark.skipif(not _triton_ready(), reason="needs CUDA and triton")
@pytest.mark.parametrize("numel", [1, 65, 1001, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_matches_reference(numel, dtype):
    x = _inputs(numel, dtype)
    codes, scales = q.quantize_blockwise_int8(x.cuda())
    ref_codes, ref_scales = q.quantize_blockwise_int8_reference(x)
    torch.testing.assert_close(scales.cpu(), ref_scales)
    assert (codes.cpu().int() - ref_codes.int()).abs().max() <= 1
    torch.testing.assert_close(q.dequantize_blockwise_int8(ref_codes.cuda(), ref_scales.cuda()).cpu(),
                               q.dequantize_blockwise_int8_reference(ref_codes, ref_scales))  # fmt: skip
    for kind in ("nf4", "int4"):
        packed, scales = q.quantize_blockwise_4bit(x.cuda(), kind=kind)
        ref_packed, ref_scales = q.quantize_blockwise_4bit_reference(x, kind=kind)
        assert (packed.cpu() != ref_packed).float().mean() < 1e-3
        torch.testing.assert_close(q.dequantize_blockwise_4bit(ref_packed.cuda(), ref_scales.cuda(), numel, kind=kind).cpu(),
                                   q.dequantize_blockwise_4bit_reference(ref_packed, ref_scales, numel, kind=kind))  # fmt: skip

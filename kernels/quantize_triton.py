"""GPU path for blockwise quantization: Triton kernels, one program per block.

Imported only when a CUDA tensor is quantized; :func:`is_available` is the capability
check (CUDA present and ``triton`` importable). The arithmetic mirrors the reference:
correctly rounded division (``div_rn``; Triton's ``/`` is approximate), no fused
multiply-adds (``enable_fp_fusion=False``), round-half-to-even by adding and
subtracting 1.5 * 2**23.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def _kernels():
    """Define the kernels on first use, so importing this module never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _round_even(v):
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def quantize_int8_kernel(x_ptr, codes_ptr, scales_ptr, numel, BLOCK: tl.constexpr, PADDED: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, PADDED)
        offsets = block * BLOCK + lanes
        mask = (lanes < BLOCK) & (offsets < numel)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        tl.store(scales_ptr + block, absmax)
        safe = tl.where(absmax > 0.0, absmax, 1.0)
        inv = tl.math.div_rn(safe * 0.0 + 1.0, safe) * 127.0  # torch: reciprocal(scale) * 127
        v = _round_even(x * inv)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(codes_ptr + offsets, v.to(tl.int8), mask=mask)

    @triton.jit
    def dequantize_int8_kernel(
        codes_ptr, scales_ptr, out_ptr, numel, BLOCK: tl.constexpr, PADDED: tl.constexpr
    ):
        block = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, PADDED)
        offsets = block * BLOCK + lanes
        mask = (lanes < BLOCK) & (offsets < numel)
        codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + block)
        step = tl.math.div_rn(scale, scale * 0.0 + 127.0)
        tl.store(out_ptr + offsets, (codes * step).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _encode_4bit(normalized, levels_ptr, INT4: tl.constexpr):
        if INT4:
            v = tl.minimum(tl.maximum(_round_even(normalized * 7.0), -7.0), 7.0)
            return (v + 7.0).to(tl.int32)
        # First argmin over |x - level| for sorted levels: count the steps where the distance falls.
        previous = tl.abs(normalized - tl.load(levels_ptr))
        index = tl.zeros_like(normalized).to(tl.int32)
        for k in tl.static_range(1, 16):
            d = tl.abs(normalized - tl.load(levels_ptr + k))
            index += (d < previous).to(tl.int32)
            previous = d
        return index

    @triton.jit
    def quantize_4bit_kernel(x_ptr, packed_ptr, scales_ptr, levels_ptr, numel,
                             BLOCK: tl.constexpr, HALF: tl.constexpr, INT4: tl.constexpr):  # fmt: skip
        block = tl.program_id(0).to(tl.int64)
        pairs = tl.arange(0, HALF)
        even = block * BLOCK + 2 * pairs
        even_mask = (2 * pairs < BLOCK) & (even < numel)
        odd_mask = (2 * pairs + 1 < BLOCK) & (even + 1 < numel)
        low = tl.load(x_ptr + even, mask=even_mask, other=0.0).to(tl.float32)
        high = tl.load(x_ptr + even + 1, mask=odd_mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(low), axis=0), tl.max(tl.abs(high), axis=0))
        tl.store(scales_ptr + block, absmax)
        safe = tl.where(absmax > 0.0, absmax, 1.0)
        low_code = _encode_4bit(tl.math.div_rn(low, low * 0.0 + safe), levels_ptr, INT4)
        high_code = _encode_4bit(tl.math.div_rn(high, high * 0.0 + safe), levels_ptr, INT4)
        high_code = tl.where(odd_mask, high_code, 0)  # the reference pads an odd tail with code 0
        packed = (low_code | (high_code << 4)).to(tl.uint8)
        tl.store(packed_ptr + block * (BLOCK // 2) + pairs, packed, mask=even_mask)

    @triton.jit
    def dequantize_4bit_kernel(packed_ptr, scales_ptr, levels_ptr, out_ptr, numel,
                               BLOCK: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
        block = tl.program_id(0).to(tl.int64)
        pairs = tl.arange(0, HALF)
        even = block * BLOCK + 2 * pairs
        even_mask = (2 * pairs < BLOCK) & (even < numel)
        odd_mask = (2 * pairs + 1 < BLOCK) & (even + 1 < numel)
        packed = tl.load(packed_ptr + block * (BLOCK // 2) + pairs, mask=even_mask, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + block)
        low = tl.load(levels_ptr + (packed & 15)) * scale
        high = tl.load(levels_ptr + (packed >> 4)) * scale
        tl.store(out_ptr + even, low.to(out_ptr.dtype.element_ty), mask=even_mask)
        tl.store(out_ptr + even + 1, high.to(out_ptr.dtype.element_ty), mask=odd_mask)

    return quantize_int8_kernel, dequantize_int8_kernel, quantize_4bit_kernel, dequantize_4bit_kernel


def _padded(block_size: int) -> int:
    return 1 << (block_size - 1).bit_length()  # tl.arange needs a power of two


def quantize_int8(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).contiguous()
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.int8, device=x.device)
    scales = torch.empty(-(-numel // block_size), dtype=torch.float32, device=x.device)
    if numel:
        kernel = _kernels()[0]
        kernel[(scales.numel(),)](flat, codes, scales, numel, BLOCK=block_size, PADDED=_padded(block_size),
                                  enable_fp_fusion=False)  # fmt: skip
    return codes, scales


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    codes = codes.reshape(-1).contiguous()
    scales = scales.to(device=codes.device, dtype=torch.float32).contiguous()
    out = torch.empty(codes.numel(), dtype=dtype, device=codes.device)
    if codes.numel():
        kernel = _kernels()[1]
        kernel[(scales.numel(),)](codes, scales, out, codes.numel(), BLOCK=block_size, PADDED=_padded(block_size),
                                  enable_fp_fusion=False)  # fmt: skip
    return out


def quantize_4bit(
    x: torch.Tensor, block_size: int, levels: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).contiguous()
    numel = flat.numel()
    packed = torch.empty(-(-numel // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty(-(-numel // block_size), dtype=torch.float32, device=x.device)
    if numel:
        kernel = _kernels()[2]
        kernel[(scales.numel(),)](flat, packed, scales, levels.to(x.device), numel, BLOCK=block_size,
                                  HALF=_padded(block_size) // 2, INT4=kind == "int4", enable_fp_fusion=False)  # fmt: skip
    return packed, scales


def dequantize_4bit(
    packed: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    block_size: int,
    levels: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    packed = packed.reshape(-1).contiguous()
    scales = scales.to(device=packed.device, dtype=torch.float32).contiguous()
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel:
        kernel = _kernels()[3]
        kernel[(scales.numel(),)](packed, scales, levels.to(packed.device), out, numel, BLOCK=block_size,
                                  HALF=_padded(block_size) // 2, enable_fp_fusion=False)  # fmt: skip
    return out

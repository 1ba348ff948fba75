"""Blockwise quantization: int8 (absmax per block) and 4-bit (NF4 or int4).

A tensor is flattened and cut into blocks of ``block_size`` elements (the last one
may be shorter). Each block stores one float32 scale (its absolute maximum) and its
values as 8-bit or 4-bit codes. 4-bit codes are packed two per byte, the first
element of a pair in the low nibble.

Error bounds (per element, ``absmax`` = the absolute maximum of its block):
    int8: |x - dequant(quant(x))| <= absmax / 254        (half a step of absmax/127)
    int4: |x - dequant(quant(x))| <= absmax / 14         (half a step of absmax/7)
    nf4:  |x - dequant(quant(x))| <= absmax * 0.1520     (half the widest NF4 gap, -1.0 to -0.6962)

The ``*_reference`` functions are plain torch and define the results. The public
functions dispatch at call time: CUDA tensors to Triton kernels (when Triton is
installed, :mod:`kernels.quantize_triton`), CPU tensors to the compiled C library
(:mod:`kernels.quantize_cpu`, bit-identical to the reference), and anything else, or
a machine where the library cannot be built, to the reference.

Non-finite inputs are not supported: a block holding inf or NaN decodes to garbage.
"""

from __future__ import annotations

import torch

from kernels import quantize_cpu

# NF4 code book: quantiles of a standard normal, scaled to [-1, 1]
# (Dettmers et al. 2023, "QLoRA", appendix E; same values as bitsandbytes).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

FOUR_BIT_KINDS = ("nf4", "int4")


def _check_block_size(block_size: int) -> None:
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten ``x`` to float32 and zero-pad it to (num_blocks, block_size)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blockwise_int8_reference(
    x: torch.Tensor, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to int8 codes with one absmax scale per block.

    Args:
        x: a floating tensor of any shape.
        block_size: elements per block (positive, even).
    Returns:
        codes: int8, shape ``(x.numel(),)``.
        scales: float32, shape ``(ceil(x.numel() / block_size),)``; each block's absmax.
    """
    _check_block_size(block_size)
    blocks = _blocks(x, block_size)  # (num_blocks, block_size)
    scales = blocks.abs().amax(dim=1)  # (num_blocks,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks * (127.0 / safe[:, None])).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: x.numel()], scales


def dequantize_blockwise_int8_reference(
    codes: torch.Tensor, scales: torch.Tensor, block_size: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_int8_reference`; returns a flat tensor of ``dtype``."""
    _check_block_size(block_size)
    numel = codes.numel()
    blocks = _blocks(codes, block_size)
    values = blocks * (scales.to(torch.float32)[:, None] / 127.0)
    return values.reshape(-1)[:numel].to(dtype)


def _four_bit_levels(kind: str) -> torch.Tensor:
    if kind == "nf4":
        return NF4_CODE
    if kind == "int4":
        return torch.arange(-7, 9, dtype=torch.float32) / 7.0  # codes 0..15 -> -1..8/7; 15 unused
    raise ValueError(f"unknown 4-bit kind {kind!r}; expected one of {FOUR_BIT_KINDS}")


def quantize_blockwise_4bit_reference(
    x: torch.Tensor, block_size: int = 64, kind: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to 4-bit codes (nearest level of ``kind``), two codes per byte.

    Returns:
        packed: uint8, shape ``(ceil(x.numel() / 2),)``.
        scales: float32, shape ``(ceil(x.numel() / block_size),)``; each block's absmax.
    """
    _check_block_size(block_size)
    levels = _four_bit_levels(kind)
    numel = x.numel()
    blocks = _blocks(x, block_size)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normalized = (blocks / safe[:, None]).reshape(-1)[:numel]
    if kind == "int4":
        codes = (torch.round(normalized * 7.0).clamp_(-7, 7) + 7).to(torch.uint8)
    else:
        levels = levels.to(normalized.device)
        codes = (normalized[:, None] - levels[None, :]).abs().argmin(dim=1).to(torch.uint8)
    if numel % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous(), scales


def dequantize_blockwise_4bit_reference(
    packed: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    block_size: int = 64,
    kind: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_4bit_reference`; returns ``numel`` values of ``dtype``."""
    _check_block_size(block_size)
    levels = _four_bit_levels(kind).to(packed.device)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel].long()
    normalized = levels[codes]
    values = _blocks(normalized, block_size) * scales.to(torch.float32)[:, None]
    return values.reshape(-1)[:numel].to(dtype)


def _triton_ready(tensor: torch.Tensor) -> bool:
    if not tensor.is_cuda:
        return False
    from kernels import quantize_triton  # imported only on CUDA machines

    return quantize_triton.is_available()


def _cpu_library(tensor: torch.Tensor):
    return quantize_cpu.load_library() if tensor.device.type == "cpu" else None


def quantize_blockwise_int8(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`quantize_blockwise_int8_reference`, on the fastest available path."""
    _check_block_size(block_size)
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise_int8 needs a floating tensor, got {x.dtype}")
    if _triton_ready(x):
        from kernels import quantize_triton

        return quantize_triton.quantize_int8(x, block_size)
    if (library := _cpu_library(x)) is not None:
        return quantize_cpu.quantize_int8(library, x, block_size)
    return quantize_blockwise_int8_reference(x, block_size)


def dequantize_blockwise_int8(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`dequantize_blockwise_int8_reference`, on the fastest available path.

    Args:
        out: a contiguous flat tensor of ``dtype`` and ``codes.numel()`` values to write the
            values into (and return) instead of a new one: no fresh pages to fault in. It
            may hold the tensor ``codes`` were quantized from.
    Raises:
        ValueError: ``out`` has another size, dtype, device or layout.
    """
    _check_block_size(block_size)
    _check_lengths(codes.numel(), scales, block_size)
    if out is not None:
        if (
            out.numel() != codes.numel()
            or out.dtype != dtype
            or out.device != codes.device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous {dtype} tensor of {codes.numel()} values on {codes.device}"
            )
        if (library := _cpu_library(codes)) is not None and scales.device.type == "cpu":
            return quantize_cpu.dequantize_int8(
                library, codes.view(torch.int8), scales, block_size, dtype, out.view(-1)
            )
        return out.view(-1).copy_(dequantize_blockwise_int8(codes, scales, block_size, dtype))
    if _triton_ready(codes):
        from kernels import quantize_triton

        return quantize_triton.dequantize_int8(codes, scales, block_size, dtype)
    if (library := _cpu_library(codes)) is not None and scales.device.type == "cpu":
        return quantize_cpu.dequantize_int8(library, codes.view(torch.int8), scales, block_size, dtype)
    return dequantize_blockwise_int8_reference(codes, scales, block_size, dtype)


def quantize_blockwise_4bit(
    x: torch.Tensor, block_size: int = 64, kind: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`quantize_blockwise_4bit_reference`, on the fastest available path."""
    _check_block_size(block_size)
    levels = _four_bit_levels(kind)
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise_4bit needs a floating tensor, got {x.dtype}")
    if _triton_ready(x):
        from kernels import quantize_triton

        return quantize_triton.quantize_4bit(x, block_size, levels, kind)
    if (library := _cpu_library(x)) is not None:
        return quantize_cpu.quantize_4bit(library, x, block_size, levels, kind)
    return quantize_blockwise_4bit_reference(x, block_size, kind)


def dequantize_blockwise_4bit(
    packed: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    block_size: int = 64,
    kind: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Same contract as :func:`dequantize_blockwise_4bit_reference`, on the fastest available path."""
    _check_block_size(block_size)
    levels = _four_bit_levels(kind)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{numel} values need {(numel + 1) // 2} packed bytes, got {packed.numel()}")
    _check_lengths(numel, scales, block_size)
    if _triton_ready(packed):
        from kernels import quantize_triton

        return quantize_triton.dequantize_4bit(packed, scales, numel, block_size, levels, dtype)
    if (library := _cpu_library(packed)) is not None and scales.device.type == "cpu":
        return quantize_cpu.dequantize_4bit(
            library, packed.view(torch.uint8), scales, numel, block_size, levels, dtype
        )
    return dequantize_blockwise_4bit_reference(packed, scales, numel, block_size, kind, dtype)


def _check_lengths(numel: int, scales: torch.Tensor, block_size: int) -> None:
    """The C and Triton paths index scales by block: refuse a short scales tensor up front."""
    if scales.numel() != -(-numel // block_size):
        raise ValueError(
            f"{numel} values in blocks of {block_size} need {-(-numel // block_size)} scales, got {scales.numel()}"
        )

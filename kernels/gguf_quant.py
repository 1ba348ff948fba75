"""Keep a GGUF file's quantized weights quantized: llama.cpp blocks -> our blockwise codes.

Which llama.cpp types our formats (:mod:`kernels.quantize`) hold exactly, and how:

- **Q8_0** (blocks of 32: an fp16 scale ``d`` and 32 int8 ``q``; ``x = d * q``) ->
  our ``int8`` with ``block_size=32``: codes ``q``, scale ``127 * d``. Our decode
  ``q * (scale / 127)`` gives back ``d`` exactly (``127 * d`` is exact in float32), so the
  dequantized weight is bit-identical to ``gguf.quants.dequantize``.
- **Q4_0** (blocks of 32: fp16 ``d`` and 32 nibbles ``q`` in 0..15; ``x = d * (q - 8)``)
  -> our ``int4`` with ``block_size=32``. Our int4 level of code ``c`` is ``(c - 7) / 7``,
  which never reaches -8/7, so the sign is flipped: code ``15 - q`` and scale ``-7 * d``
  give ``(7 - 15 + q) * d = (q - 8) * d``. The codes and scales are lossless; the decode
  differs from gguf's only by float32 rounding of ``(c - 7) / 7`` (<= 1 ulp per element).
  llama.cpp stores element ``j`` and ``j + 16`` of a block in one byte; we repack them to
  our (``2k``, ``2k + 1``) pairs.
- **Q4_1** (``x = d * q + m``) has a per-block offset ``m`` that a symmetric absmax format
  cannot hold, and the K-quants have two-level scales: those tensors are dequantized to
  the serving dtype (:func:`keepable` says which).

The q/k row permutation llama.cpp applies (:func:`kernels.gguf.unpermute_rows`) moves
whole rows; a row is a whole number of 32-element blocks, so it is undone on the codes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels.gguf import architecture_of, find_tensor, gguf_tensor_name, heads_of, needs_unpermute, open_gguf
from kernels.gguf import unpermute_rows as _unpermute
from kernels.quantized_linear import QuantizedLinear

GGUF_BLOCK = 32  # elements per Q8_0 / Q4_0 block


def keepable(path, name: str) -> bool:
    """Whether the tensor ``name`` (ours) is Q8_0 or Q4_0, which our codes hold exactly."""
    from gguf import GGMLQuantizationType as Q

    tensor = find_tensor(open_gguf(path), gguf_tensor_name(name))
    return tensor.tensor_type in (Q.Q8_0, Q.Q4_0)


def _q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes (rows, cols // 32 * 34) -> int8 codes (rows, cols), float32 scales (rows, cols // 32)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // GGUF_BLOCK, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d * np.float32(127))


def _q4_0(raw: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 bytes (rows, cols // 32 * 18) -> our int4 codes (rows, cols) unpacked, scales (rows, cols // 32)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // GGUF_BLOCK, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 2:]  # (rows, blocks, 16): low nibble element j, high nibble element j + 16
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # (rows, blocks, 32) in element order
    codes = (15 - q).astype(np.uint8).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d * np.float32(-7))


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked 4-bit codes (n,) (n even) -> (n // 2,) uint8, first of each pair in the low nibble."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def quantized_linear_from_codes(
    in_features: int,
    out_features: int,
    kind: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    weight_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    block_size: int = GGUF_BLOCK,
) -> QuantizedLinear:
    """A :class:`QuantizedLinear` holding given codes (int8 flat, or 4-bit packed) and scales."""
    layer = QuantizedLinear.__new__(QuantizedLinear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.kind, layer.block_size, layer.weight_dtype = kind, block_size, weight_dtype
    layer.register_buffer("codes", codes.reshape(-1).contiguous())
    layer.register_buffer("scales", scales.reshape(-1).to(torch.float32).contiguous())
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return layer


def read_quantized_linear(
    path,
    weight_name: str,
    config,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    bias: torch.Tensor | None = None,
) -> QuantizedLinear:
    """The Q8_0 / Q4_0 weight ``weight_name`` (ours) as a QuantizedLinear, codes kept as stored."""
    from gguf import GGMLQuantizationType as Q

    reader = open_gguf(path)
    tensor = find_tensor(reader, gguf_tensor_name(weight_name))
    cols, rows = (int(n) for n in tensor.shape)  # ggml order: (in_features, out_features)
    if tensor.tensor_type == Q.Q8_0:
        kind, (codes, scales) = "int8", _q8_0(tensor.data, rows, cols)
    elif tensor.tensor_type == Q.Q4_0:
        kind, (codes, scales) = "int4", _q4_0(tensor.data, rows, cols)
    else:
        raise ValueError(f"{weight_name} is {tensor.tensor_type.name}; only Q8_0 and Q4_0 can be kept")
    if needs_unpermute(architecture_of(reader), weight_name):
        heads = heads_of(weight_name, config)
        codes, scales = _unpermute(codes, heads), _unpermute(scales, heads)
    codes = codes.reshape(-1)
    if kind == "int4":
        codes = _pack_pairs(codes)
    return quantized_linear_from_codes(
        cols,
        rows,
        kind,
        codes.to(device),
        scales.to(device),
        dtype,
        None if bias is None else bias.to(device),
    )

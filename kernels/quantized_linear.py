"""Weight-only quantized linear layers: serve more blocks on a small GPU.

The weight (out_features, in_features) is stored as blockwise codes (int8, NF4 or
int4, see :mod:`kernels.quantize`); each forward dequantizes it to the activation
dtype and runs a plain ``F.linear``. Activations and the bias stay in float.

Error bound: every weight element is off by at most ``WEIGHT_ERROR_BOUND[kind]``
times the absmax of its block, so for an input row ``x`` each output element is off by
at most ``WEIGHT_ERROR_BOUND[kind] * sum_j |x_j| * absmax(block of W[i, j])``
(plus float rounding of the matmul itself); :func:`bound_output_error` computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.quantize import (
    dequantize_blockwise_4bit,
    dequantize_blockwise_int8,
    quantize_blockwise_4bit,
    quantize_blockwise_int8,
)

# Worst-case |w - dequant(quant(w))| as a fraction of the block's absmax (kernels.quantize docstring).
WEIGHT_ERROR_BOUND = {"int8": 1 / 254, "int4": 1 / 14, "nf4": 0.1520}
QUANTIZED_KINDS = tuple(WEIGHT_ERROR_BOUND)


class QuantizedLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W held as blockwise codes."""

    def __init__(self, linear: nn.Linear, kind: str = "int8", block_size: int = 64) -> None:
        super().__init__()
        if kind not in QUANTIZED_KINDS:
            raise ValueError(f"kind must be one of {QUANTIZED_KINDS}, got {kind!r}")
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind, self.block_size, self.weight_dtype = kind, block_size, weight.dtype
        if kind == "int8":
            codes, scales = quantize_blockwise_int8(weight, block_size)
        else:
            codes, scales = quantize_blockwise_4bit(weight, block_size, kind)
        self.register_buffer("codes", codes)  # int8 (out*in,) or uint8 (ceil(out*in / 2),)
        self.register_buffer("scales", scales)  # float32 (ceil(out*in / block_size),)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out_features, in_features) the codes stand for."""
        dtype = dtype or self.weight_dtype
        numel = self.in_features * self.out_features
        if self.kind == "int8":
            flat = dequantize_blockwise_int8(self.codes, self.scales, self.block_size, dtype)
        else:
            flat = dequantize_blockwise_4bit(
                self.codes, self.scales, numel, self.block_size, self.kind, dtype
            )
        return flat.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, block_size={self.block_size}"


def quantize_linears_(module: nn.Module, kind: str = "int8", block_size: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` by a :class:`QuantizedLinear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantizedLinear(child, kind, block_size))
        else:
            quantize_linears_(child, kind, block_size)
    return module


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def bound_output_error(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |layer(x) - float_layer(x)| from the weight bound, shape of the output."""
    numel = layer.in_features * layer.out_features
    absmax = layer.scales.float().repeat_interleave(layer.block_size)[:numel]  # each weight's block absmax
    weight_bound = (WEIGHT_ERROR_BOUND[layer.kind] * absmax).view(layer.out_features, layer.in_features)
    return x.abs().float() @ weight_bound.T

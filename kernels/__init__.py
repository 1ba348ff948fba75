"""Pure compute: model blocks, checkpoint loading, quantization. No networking."""

from kernels.quantize import (
    dequantize_blockwise_4bit,
    dequantize_blockwise_int8,
    quantize_blockwise_4bit,
    quantize_blockwise_int8,
)

__all__ = [
    "dequantize_blockwise_4bit",
    "dequantize_blockwise_int8",
    "quantize_blockwise_4bit",
    "quantize_blockwise_int8",
]

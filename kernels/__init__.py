"""Pure compute: model blocks, checkpoint loading, quantization. No networking."""

from kernels.cache import KVCache, LayerCache, gather_prefixes, scatter_new_tokens
from kernels.checkpoint import (
    CheckpointError,
    load_blocks,
    load_client_pieces,
    load_local_model,
    read_weight_map,
)
from kernels.config import ModelConfig, UnsupportedModelError, load_config
from kernels.local_generation import generate, sample_next_token
from kernels.model import BlockSpan, ClientPieces, LocalModel, TransformerBlock
from kernels.quantize import (
    dequantize_blockwise_4bit,
    dequantize_blockwise_int8,
    quantize_blockwise_4bit,
    quantize_blockwise_int8,
)
from kernels.quantized_linear import QuantizedLinear, module_nbytes, quantize_linears_
from kernels.tiny import write_tiny_checkpoint

__all__ = [
    "BlockSpan",
    "CheckpointError",
    "ClientPieces",
    "KVCache",
    "LayerCache",
    "LocalModel",
    "ModelConfig",
    "QuantizedLinear",
    "TransformerBlock",
    "UnsupportedModelError",
    "dequantize_blockwise_4bit",
    "dequantize_blockwise_int8",
    "gather_prefixes",
    "generate",
    "load_blocks",
    "load_client_pieces",
    "load_config",
    "load_local_model",
    "module_nbytes",
    "quantize_blockwise_4bit",
    "quantize_blockwise_int8",
    "quantize_linears_",
    "read_weight_map",
    "sample_next_token",
    "scatter_new_tokens",
    "write_tiny_checkpoint",
]

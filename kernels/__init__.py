"""Pure compute: model blocks, checkpoint loading (directories and GGUF files), quantization,
and the text side of a checkpoint (tokenizer, chat template). No networking."""

from kernels.cache import KVCache, LayerCache, gather_prefixes, scatter_new_tokens
from kernels.chat_template import ChatTemplateError, render_chat
from kernels.checkpoint import (
    CheckpointError,
    load_blocks,
    load_client_pieces,
    load_local_model,
    read_weight_map,
)
from kernels.gguf import GGUFError, is_gguf
from kernels.local_generation import generate, next_token_probabilities, sample_next_token
from kernels.model import BlockSpan, ClientPieces, LocalModel, TransformerBlock
from kernels.model_config import ModelConfig, UnsupportedModelError, load_config
from kernels.quantize import (
    dequantize_blockwise_4bit,
    dequantize_blockwise_int8,
    quantize_blockwise_4bit,
    quantize_blockwise_int8,
)
from kernels.quantized_linear import QuantizedLinear, module_nbytes, quantize_linears_
from kernels.tiny import write_tiny_checkpoint
from kernels.tokenizer import MissingTokenizerError, TextTokenizer, load_tokenizer

__all__ = [
    "BlockSpan",
    "ChatTemplateError",
    "CheckpointError",
    "ClientPieces",
    "GGUFError",
    "KVCache",
    "LayerCache",
    "LocalModel",
    "MissingTokenizerError",
    "ModelConfig",
    "QuantizedLinear",
    "TextTokenizer",
    "TransformerBlock",
    "UnsupportedModelError",
    "dequantize_blockwise_4bit",
    "dequantize_blockwise_int8",
    "gather_prefixes",
    "generate",
    "is_gguf",
    "load_blocks",
    "load_client_pieces",
    "load_config",
    "load_local_model",
    "load_tokenizer",
    "module_nbytes",
    "next_token_probabilities",
    "quantize_blockwise_4bit",
    "quantize_blockwise_int8",
    "quantize_linears_",
    "read_weight_map",
    "render_chat",
    "sample_next_token",
    "scatter_new_tokens",
    "write_tiny_checkpoint",
]

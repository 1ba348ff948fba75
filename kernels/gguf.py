"""Read a GGUF checkpoint (llama.cpp's single-file format): config, tensors, quantized codes.

The file is memory-mapped by ``gguf.GGUFReader``; a tensor's bytes are touched only when
it is read, so a server serving blocks 10..20 reads only those blocks' tensors.

What differs from a Hugging Face directory, and what we do about it:

- The config is metadata under ``{architecture}.*`` keys (``llama.block_count``, ...);
  :func:`gguf_config_dict` turns it into the ``config.json`` dict ``ModelConfig`` reads.
- Tensor names are llama.cpp's (``blk.3.attn_q.weight``); :func:`gguf_tensor_name` maps
  ours onto them.
- For the ``llama`` architecture, llama.cpp's converter permutes the rows of the q and k
  projections so its rotary code can rotate adjacent pairs (GPT-J style); our model (and
  transformers) rotates the two halves of each head. :func:`unpermute_rows` undoes it,
  as transformers' GGUF loader does (``LlamaTensorProcessor._reverse_permute_weights``).
  Qwen2 files are written unpermuted.
- Weights may be quantized (Q8_0, Q4_0, Q4_K, ...). They are dequantized with
  ``gguf.quants`` to the requested dtype, or kept as codes where our blockwise formats
  hold them exactly (see :mod:`kernels.gguf_quant`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_SUFFIX = ".gguf"
# GGUF architecture -> our model_type; both are Llama-family blocks we implement.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp permuted for its rotary layout.
_PERMUTED_ARCHITECTURES = ("llama",)

# Our per-block parameter names -> llama.cpp's (after "blk.{i}.").
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class GGUFError(ValueError):
    """The GGUF file lacks a key or tensor we need, or holds one we cannot read (fatal for this load)."""


def is_gguf(path: str | Path) -> bool:
    """True for a path naming a ``.gguf`` file (the suffix decides; the file is not opened)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


@functools.lru_cache(maxsize=4)
def _open(path: str, _modified_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` for ``path``, shared within this process while the file is unchanged."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path} does not exist or is not a file")
    return _open(path, os.stat(path).st_mtime_ns)


def read_field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as Python (str, int, float, bool or list); ``default`` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def architecture_of(reader) -> str:
    """The GGUF ``general.architecture``; raises UnsupportedModelError for others than we serve."""
    from kernels.model_config import UnsupportedModelError

    architecture = read_field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def gguf_config_dict(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` dict (transformers layout) that this GGUF's metadata describes."""
    from kernels.model_config import UnsupportedModelError

    reader = open_gguf(path)
    arch = architecture_of(reader)

    def key(name: str, default: Any = None) -> Any:
        return read_field(reader, f"{arch}.{name}", default)

    names = {tensor.name for tensor in reader.tensors}
    hidden, heads = key("embedding_length"), key("attention.head_count")
    if hidden is None or heads is None or key("block_count") is None:
        raise GGUFError(f"{path} lacks {arch}.embedding_length, .attention.head_count or .block_count")
    head_dim = key("attention.key_length") or hidden // heads
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(
            "partial rotary embeddings (rope.dimension_count != head dim) are not supported"
        )
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            "this GGUF carries rope_freqs (Llama 3.1-style rope scaling written as factors); not supported yet"
        )
    rope_type = key("rope.scaling.type", "none")
    if rope_type not in ("none", "linear"):
        raise UnsupportedModelError(f"GGUF rope scaling {rope_type!r} is not supported (none, linear)")
    vocab = key("vocab_size") or len(read_field(reader, "tokenizer.ggml.tokens", ()))
    if not vocab:
        vocab = int(find_tensor(reader, "token_embd.weight").shape[-1])
    raw: dict[str, Any] = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": read_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": read_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if rope_type == "linear":
        raw["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return raw


def gguf_tensor_name(name: str) -> str:
    """Our (Hugging Face) tensor name -> llama.cpp's, e.g. ``model.layers.3.mlp.up_proj.weight``
    -> ``blk.3.ffn_up.weight``."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix = "model.layers."
    if name.startswith(prefix):
        index, rest = name[len(prefix) :].split(".", 1)
        for ours, theirs in _BLOCK_NAMES.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"blk.{index}.{theirs}{rest[len(ours) :]}"
    raise GGUFError(f"no GGUF name for tensor {name!r}")


def block_tensor_names(path: str | Path, index: int) -> list[str]:
    """Our names of block ``index``'s tensors present in the file."""
    reader = open_gguf(path)
    present = {tensor.name for tensor in reader.tensors}
    names = []
    for ours in _BLOCK_NAMES:
        suffixes = ("",) if ours.endswith(".weight") else (".weight", ".bias")
        for suffix in suffixes:
            name = f"model.layers.{index}.{ours}{suffix}"
            if gguf_tensor_name(name) in present:
                names.append(name)
    return names


def find_tensor(reader, gguf_name: str):
    """The reader's tensor named ``gguf_name`` (llama.cpp name)."""
    for tensor in reader.tensors:
        if tensor.name == gguf_name:
            return tensor
    raise GGUFError(f"the GGUF file lacks tensor {gguf_name}")


def needs_unpermute(architecture: str, name: str) -> bool:
    """Whether ``name`` (ours) is a q or k projection whose rows llama.cpp permuted."""
    return architecture in _PERMUTED_ARCHITECTURES and (".q_proj." in name or ".k_proj." in name)


def unpermute_rows(rows: np.ndarray | torch.Tensor, heads: int) -> np.ndarray | torch.Tensor:
    """Undo llama.cpp's rotary permutation of a q/k weight (or bias): rows (heads * head_dim, ...).

    llama.cpp wrote head ``h``'s rows as ``reshape(2, head_dim // 2).swap`` (pairs
    interleaved); this puts the two halves of each head back one after the other.
    """
    shape = rows.shape
    half = shape[0] // heads // 2
    out = rows.reshape(heads, half, 2, *shape[1:])
    out = out.swapaxes(2, 1) if isinstance(out, np.ndarray) else out.transpose(1, 2)
    return out.reshape(shape)


def heads_of(name: str, config) -> int:
    """Heads in a q (query heads) or k (key/value heads) projection."""
    return config.num_heads if ".q_proj." in name else config.num_kv_heads


def read_gguf_tensors(
    path: str | Path,
    names: list[str],
    config,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Exactly ``names`` (ours), dequantized to ``dtype`` (float32 when None), q/k unpermuted."""
    from gguf import quants

    reader = open_gguf(path)
    arch = architecture_of(reader)
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        tensor = find_tensor(reader, gguf_tensor_name(name))
        values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # ggml shape is reversed
        if needs_unpermute(arch, name):
            values = unpermute_rows(values, heads_of(name, config))
        # np.array copies: the result must not alias the read-only memory map.
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32)).to(
            device, dtype or torch.float32
        )
    return tensors

"""Write a Hugging Face checkpoint directory as a GGUF file (llama.cpp's layout), with ``gguf``'s writer.

Used by the tests (tiny random checkpoints -> small GGUF files that both we and
``transformers`` load) and usable to convert a small model by hand. It writes what
llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama or Qwen2 model: the config as
``{arch}.*`` metadata, q/k rows permuted for llama.cpp's rotary layout (llama only),
the byte-level BPE tokenizer as ``tokenizer.ggml.*`` (tokens, token types, merges,
special ids) and the chat template. Linear weights (and the embedding / head) may be
quantized to any type ``gguf.quants`` can write; norms stay float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kernels.checkpoint import read_tensors, read_weight_map
from kernels.gguf import gguf_tensor_name, heads_of, needs_unpermute
from kernels.model_config import load_config
from kernels.tokenizer import read_sampling_defaults

_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # llama.cpp token types


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary permutation of a q/k weight (inverse of ``kernels.gguf.unpermute_rows``)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tokenizer_metadata(directory: Path) -> dict:
    """tokens, token types, merges and special ids from ``tokenizer.json`` (byte-level BPE)."""
    raw = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(raw["model"]["vocab"])
    special = {token["content"] for token in raw.get("added_tokens", []) if token.get("special")}
    for token in raw.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    types = [_TOKEN_CONTROL if token in special else _TOKEN_NORMAL for token in tokens]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(
    checkpoint_dir: str | Path, path: str | Path, weight_type: str = "F32", name: str = "tiny"
) -> Path:
    """Write ``checkpoint_dir`` as the GGUF file ``path``; returns ``path``.

    Args:
        checkpoint_dir: a Hugging Face directory (config.json, safetensors, tokenizer.json).
        path: the file to write.
        weight_type: ``gguf.GGMLQuantizationType`` name for 2-D weights ("F32", "F16",
            "Q8_0", "Q4_0", "Q4_1", ...); norms are always F32.
        name: ``general.name``.
    """
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    directory, path = Path(checkpoint_dir), Path(path)
    config = load_config(directory)
    arch = config.model_type
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF export supports llama and qwen2, not {arch}")
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type("linear")
        writer.add_rope_scaling_factor(config.rope_factor)
    elif config.rope_type != "default":
        raise ValueError(f"GGUF export does not write rope type {config.rope_type}")
    if (directory / "tokenizer.json").exists():
        tokenizer = _tokenizer_metadata(directory)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        writer.add_token_merges(tokenizer["merges"])
        writer.add_add_bos_token(False)
        if config.bos_token_id is not None:
            writer.add_bos_token_id(config.bos_token_id)
        if config.eos_token_id is not None:
            writer.add_eos_token_id(config.eos_token_id)
    sampling = read_sampling_defaults(directory)  # generation_config.json, as llama.cpp's converter writes it
    for name, add in (("temperature", writer.add_sampling_temp), ("top_k", writer.add_sampling_top_k),
                      ("top_p", writer.add_sampling_top_p), ("repetition_penalty", writer.add_sampling_penalty_repeat)):  # fmt: skip
        if name in sampling:
            add(sampling[name])
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.exists():
        template = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            writer.add_chat_template(template)
    qtype = GGMLQuantizationType[weight_type]
    weight_map = read_weight_map(directory)
    tensors = read_tensors(directory, list(weight_map), weight_map, torch.float32)
    for ours, tensor in tensors.items():
        if ours.endswith("rotary_emb.inv_freq"):
            continue
        values = tensor.numpy()
        if needs_unpermute(arch, ours):
            values = permute_rows(values, heads_of(ours, config))
        theirs = gguf_tensor_name(ours)
        if values.ndim == 2 and qtype not in (GGMLQuantizationType.F32,):
            writer.add_tensor(theirs, quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(theirs, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

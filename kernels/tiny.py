"""Write a tiny random checkpoint in the Hugging Face layout (for tests and the demo).

The directory gets ``config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``tokenizer.json`` (byte-level BPE trained here on
a few Python standard library sources) and ``tokenizer_config.json``. Nothing is
downloaded and ``transformers`` is not needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.model_config import ModelConfig

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>")
_CORPUS_MODULES = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py")
_FALLBACK_TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 50


def train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE with ``vocab_size`` entries trained on stdlib sources; returns a ``Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(os.__file__).parent
    texts = [p.read_text(encoding="utf-8") for name in _CORPUS_MODULES if (p := stdlib / name).exists()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or [_FALLBACK_TEXT], trainer=trainer)
    return tokenizer


def make_random_state(config: ModelConfig, seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random float32 tensors under Hugging Face names. Norm weights are ~1 (not exactly 1)
    so a norm that is loaded wrong changes the output."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, mean: float = 0.0, scale: float = std) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale + mean

    h, inner, d = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    state = {"model.embed_tokens.weight": normal(config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = normal(h, mean=1.0)
        state[p + "post_attention_layernorm.weight"] = normal(h, mean=1.0)
        for name, (rows, cols) in {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h),
                                   "o_proj": (h, q_out)}.items():  # fmt: skip
            state[p + f"self_attn.{name}.weight"] = normal(rows, cols)
        if config.attention_bias:
            for name, rows in {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out}.items():
                state[p + f"self_attn.{name}.bias"] = normal(rows)
        if config.output_bias:
            state[p + "self_attn.o_proj.bias"] = normal(h)
        for name, (rows, cols) in {
            "gate_proj": (inner, h),
            "up_proj": (inner, h),
            "down_proj": (h, inner),
        }.items():
            state[p + f"mlp.{name}.weight"] = normal(rows, cols)
            if config.mlp_bias:
                state[p + f"mlp.{name}.bias"] = normal(rows)
    state["model.norm.weight"] = normal(h, mean=1.0)
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = normal(config.vocab_size, h)
    return state


def save_checkpoint(
    directory: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], num_shards: int = 1
) -> None:
    """Write ``config.json`` and the tensors, split by name order into ``num_shards`` files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    names = list(state)  # embed, layers in order, norm, head: shards hold consecutive blocks
    if num_shards == 1:
        save_file({n: state[n].contiguous() for n in names}, str(directory / "model.safetensors"))
        return
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        shard_names = names[shard * per_shard : (shard + 1) * per_shard]
        save_file(
            {n: state[n].contiguous() for n in shard_names},
            str(directory / file_name),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(shard_names, file_name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_tiny_checkpoint(
    directory: str | Path,
    model_type: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    num_shards: int = 1,
    seed: int = 0,
    vocab_size: int = 512,
    chat_template: str | None = None,
    **overrides,
) -> ModelConfig:
    """Write a tiny random model; ``overrides`` set any other :class:`ModelConfig` field.

    ``chat_template`` (Jinja) goes into ``tokenizer_config.json`` when given.

    Returns the config that was written (read back by ``load_config``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    bos, eos = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    fields = {
        "model_type": model_type,
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_layers": num_layers,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": hidden_size // 4,
        "attention_bias": model_type == "qwen2",
        "max_position_embeddings": 2048,
        "bos_token_id": bos,
        "eos_token_id": eos,
        **overrides,
    }
    config = ModelConfig(**fields)
    save_checkpoint(directory, config, make_random_state(config, seed), num_shards)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0],
                        "eos_token": SPECIAL_TOKENS[1], "model_max_length": config.max_position_embeddings}  # fmt: skip
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return config

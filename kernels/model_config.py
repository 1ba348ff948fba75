"""Model configuration read from a Hugging Face checkpoint's ``config.json``.

One frozen dataclass covers the Llama family we serve: Llama 2/3, Mistral and Qwen2
(grouped-query attention, RMSNorm, rotary embeddings, SwiGLU). Both spellings of the
rotary options are read: the older top-level ``rope_theta`` + ``rope_scaling`` and the
``rope_parameters`` dict that transformers 5 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for a model type or option this package does not implement (fatal)."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the SwiGLU MLP
    num_layers: int  # "num_hidden_layers" in config.json
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; < num_heads means grouped-query attention
    head_dim: int  # hidden_size // num_heads unless config.json says otherwise
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3"
    rope_factor: float = 1.0  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 8192  # llama3 only
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q/k/v (and o for llama); qwen2 has q/k/v bias only
    output_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # mistral: keys older than this many positions are masked
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the parsed ``config.json``; raises UnsupportedModelError naming the option."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"pretraining_tp={raw['pretraining_tp']} is not supported (only 1)")
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise UnsupportedModelError("qwen2 use_sliding_window=true is not supported")
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        rope = _read_rope(raw)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):  # Llama 3 lists several stop tokens; generation uses the first
            eos = eos[0] if eos else None
        qwen = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            attention_bias=True if qwen else bool(raw.get("attention_bias", False)),
            output_bias=False if qwen else bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=raw.get("sliding_window") if model_type == "mistral" else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            **rope,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict (transformers layout) that :meth:`from_dict` reads back."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_positions,
            )
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if rope["rope_type"] != "default":
            out["rope_scaling"] = rope
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        return out


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _read_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """Rotary options from either ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1.0 is not supported")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        out["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        out["rope_original_max_positions"] = int(merged["original_max_position_embeddings"])
    return out


# Token ids do not change what a block computes: a client and servers that differ only there agree.
_NOT_HASHED = ("bos_token_id", "eos_token_id")


def config_fingerprint(config: ModelConfig) -> dict[str, Any]:
    """The fields that make two checkpoints the same model to a server, as plain values.

    ``rms_norm_eps`` is taken at float32 precision, the precision a GGUF file stores it in,
    so a directory and its GGUF conversion have the same fingerprint.
    """
    values = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_HASHED
    }
    values["rms_norm_eps"] = float(struct.unpack("f", struct.pack("f", config.rms_norm_eps))[0])
    return values


def config_hash(config: ModelConfig) -> str:
    """Short hash of :func:`config_fingerprint`: peers with another hash serve another model."""
    encoded = json.dumps(config_fingerprint(config), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def describe_config_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """``"rope_theta: 10000.0 here, 500000.0 there; ..."`` for the fields whose values differ."""
    names = sorted(set(ours) | set(theirs))
    return "; ".join(f"{name}: {ours.get(name)!r} here, {theirs.get(name)!r} there"
                     for name in names if ours.get(name) != theirs.get(name))  # fmt: skip


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read ``checkpoint_dir/config.json``, or a ``.gguf`` file's metadata."""
    from kernels.gguf import gguf_config_dict, is_gguf

    if is_gguf(checkpoint_dir):
        return ModelConfig.from_dict(gguf_config_dict(checkpoint_dir))
    path = Path(checkpoint_dir) / "config.json"
    with open(path, encoding="utf-8") as file:
        return ModelConfig.from_dict(json.load(file))

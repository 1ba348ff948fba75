"""Llama-family transformer: blocks (served by peers) and the client pieces.

Parameter names follow the Hugging Face layout (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ...) so a block's state dict is the checkpoint's tensors with the
``model.layers.{i}.`` prefix removed.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cache import KVCache, LayerCache, write_to_cache
from kernels.model_config import ModelConfig

# torch >= 2.5 lets SDPA broadcast key/value heads itself (no copy of the cache for GQA).
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back before the weight (as the reference implementation does)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@functools.lru_cache(maxsize=64)
def compute_inverse_frequencies(config: ModelConfig, device: torch.device) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim // 2,), float32, with linear / Llama-3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        # Llama 3.1 "rope_scaling": long wavelengths are slowed by `factor`, short ones kept,
        # the band between them interpolated (Meta's reference code, same constants).
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_context = config.rope_original_max_positions
        low_wavelength, high_wavelength = old_context / low, old_context / high
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < high_wavelength) * ~(wavelength > low_wavelength)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device)


def compute_rotary(
    config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (batch, 1, seq, head_dim), for positions (batch, seq)."""
    inv_freq = compute_inverse_frequencies(config, positions.device)
    angles = positions[..., None].to(torch.float32) * inv_freq  # (batch, seq, head_dim // 2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (batch, 1, seq, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=config.output_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape  # (batch, seq, hidden)
        c = self.config
        q = self.q_proj(x).view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)  # (b, h, s, d)
        k = self.k_proj(x).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (b, kvh, s, d)
        v = self.v_proj(x).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = compute_rotary(c, positions, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = _attend(q, k, v, None, c.sliding_window)
        else:
            write_to_cache(cache, k, v)
            keys = cache.keys[:, :, : cache.attend_length]  # (b, kvh, attend_length, d)
            values = cache.values[:, :, : cache.attend_length]
            out = _attend(q, keys.to(q.dtype), values.to(q.dtype), cache.mask, None)
        out = out.transpose(1, 2).reshape(batch, seq, c.num_heads * c.head_dim)
        return self.o_proj(out)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sliding_window: int | None
) -> torch.Tensor:
    """SDPA with grouped-query heads; causal when no mask is given."""
    seq = q.shape[2]
    if mask is None and sliding_window is not None and seq > sliding_window:
        positions = torch.arange(seq, device=q.device)
        distance = positions[:, None] - positions[None, :]  # (seq, seq): query - key
        mask = (distance >= 0) & (distance < sliding_window)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **extra)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """hidden (batch, seq, hidden) -> (batch, seq, hidden).

        Without a cache: a causal forward from position 0. With one: the new tokens go
        to ``cache.positions`` and their keys/values are written into the cache.
        """
        if cache is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        else:
            positions = cache.positions
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), positions, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class BlockSpan(nn.Module):
    """Blocks [start, start + len(blocks)) of a model: what one server holds."""

    def __init__(self, config: ModelConfig, blocks: list[TransformerBlock], start: int = 0) -> None:
        super().__init__()
        self.config = config
        self.start = start
        self.blocks = nn.ModuleList(blocks)

    @property
    def end(self) -> int:
        return self.start + len(self.blocks)

    def allocate_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        param = next(self.parameters())
        return KVCache.allocate(
            self.config, len(self.blocks), batch_size, max_length, dtype or param.dtype, param.device
        )

    def forward(self, hidden: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Run every block; with a cache, append the new tokens and advance its lengths."""
        if cache is None:
            for block in self.blocks:
                hidden = block(hidden)
            return hidden
        if len(cache.keys) != len(self.blocks):
            raise ValueError(f"cache holds {len(cache.keys)} blocks, span has {len(self.blocks)}")
        for block, layer in zip(self.blocks, cache.begin_step(hidden.shape[1]), strict=True):
            hidden = block(hidden, layer)
        cache.advance(hidden.shape[1])
        return hidden


class ClientPieces(nn.Module):
    """What the client holds: token embeddings, the final norm and the LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (batch, seq) -> hidden (batch, seq, hidden)."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, seq, hidden) -> logits (batch, seq, vocab), in float32."""
        return self.lm_head(self.norm(hidden)).float()


class LocalModel(nn.Module):
    """Embed + all blocks + norm + head in one process: the local-generation baseline."""

    def __init__(self, client: ClientPieces, span: BlockSpan) -> None:
        super().__init__()
        if span.start != 0 or span.end != client.config.num_layers:
            raise ValueError(f"a local model needs blocks [0, {client.config.num_layers}), got "
                             f"[{span.start}, {span.end})")  # fmt: skip
        self.config = client.config
        self.client = client
        self.span = span

    def allocate_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.span.allocate_cache(batch_size, max_length)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab) float32."""
        return self.client.logits(self.span(self.client.embed(input_ids), cache))

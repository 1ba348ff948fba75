"""``SpanLoader``: what a server needs to know and do about the weights it can host.

Loads a span of blocks (quantized as configured) onto the server's device, bounds how
many blocks fit in memory next to their attention cache, and measures (or reads from
the cache file, or takes from ``--throughput``) the tokens/s of one block.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kernels import BlockSpan, load_blocks, load_config, module_nbytes, quantize_linears_
from swarm import Span, max_blocks_for_memory
from swarm.serving.settings import ServerConfig, resolve_device, resolve_dtype
from swarm.throughput import ThroughputCache, measure_compute_throughput, throughput_cache_key


def config_hash(checkpoint_dir: str) -> str:
    """Short hash of the checkpoint's config.json: peers with another hash serve another model."""
    raw = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


class SpanLoader:
    """Loads, sizes and measures blocks of ``config.model`` on the configured device and dtype.

    Args:
        config: the server's configuration.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_config = load_config(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)

    def load(self, span: Span) -> BlockSpan:
        """The span's blocks, quantized as configured, in eval mode on the device."""
        blocks = load_blocks(
            self.config.model, span.start, span.end, self.dtype, self.device, self.model_config
        )
        if self.config.quant != "none":
            quantize_linears_(blocks, kind=self.config.quant)
        return blocks.eval()

    def span_limit(self) -> int:
        """Blocks this server may hold: what memory allows, capped by ``--max-blocks``."""
        max_blocks = self._max_blocks()
        if self.config.max_blocks:
            max_blocks = min(max_blocks, self.config.max_blocks)
        return max_blocks

    def _max_blocks(self) -> int:
        one_block = load_blocks(self.config.model, 0, 1, self.dtype, "cpu", self.model_config)
        if self.config.quant != "none":
            quantize_linears_(one_block, kind=self.config.quant)
        per_block = module_nbytes(one_block)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        config = self.model_config
        cache_per_block = (
            2 * config.num_kv_heads * config.head_dim * self.dtype.itemsize * self.config.cache_tokens
        )
        return max_blocks_for_memory(int(free * 0.8), per_block, cache_per_block)

    def measure_throughput(self) -> float:
        """Tokens/s through one block (cached per device, dtype and model), or ``--throughput``."""
        if self.config.throughput:
            return self.config.throughput
        cache = ThroughputCache(os.path.expanduser(self.config.throughput_cache))
        key = throughput_cache_key(
            self.device.type, f"{self.dtype}-{self.config.quant}", config_hash(self.config.model)
        )
        cached = cache.get(key)
        if cached is not None:
            return cached
        block = load_blocks(self.config.model, 0, 1, self.dtype, self.device, self.model_config)
        if self.config.quant != "none":
            quantize_linears_(block, kind=self.config.quant)
        hidden = torch.randn(1, 16, self.model_config.hidden_size, dtype=self.dtype, device=self.device)

        def step() -> None:
            with torch.inference_mode():
                block(hidden)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        value = measure_compute_throughput(step, 16, steps=5)
        cache.put(key, value)
        return value

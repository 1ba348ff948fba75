"""``SpanLoader``: what a server needs to know and do about the weights it can host.

Loads a span of blocks (quantized as configured, or with ``--quant keep`` holding a GGUF
file's Q8_0 / Q4_0 codes as they are) onto the server's device, bounds how
many blocks fit in memory next to their attention cache, and measures (or reads from
the cache file, or takes from ``--throughput``) the tokens/s of one block.
"""

from __future__ import annotations

import os

import torch

from kernels import BlockSpan, load_blocks, load_config, module_nbytes, quantize_linears_
from kernels.lora import attach_hooks
from kernels.model_config import config_hash
from swarm import Span, max_blocks_for_memory
from swarm.serving.settings import ServerConfig, resolve_device, resolve_dtype
from swarm.throughput import ThroughputCache, measure_compute_throughput, throughput_cache_key


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
        """The span's blocks, quantized as configured, in eval mode on the device, with the (dormant)
        LoRA hooks attached now: attaching one later, while another thread runs the same block,
        would change its hooks mid-iteration."""
        blocks = self._load(span.start, span.end, self.device).eval()
        attach_hooks(blocks)
        return blocks

    def _load(self, start: int, end: int, device) -> BlockSpan:
        keep = self.config.quant == "keep"
        blocks = load_blocks(self.config.model, start, end, self.dtype, device, self.model_config, keep)
        if self.config.quant not in ("none", "keep"):
            quantize_linears_(blocks, kind=self.config.quant)
        return blocks

    def span_limit(self) -> int:
        """Blocks this server may hold: what memory allows, capped by ``--max-blocks``."""
        max_blocks = self._max_blocks()
        if self.config.max_blocks:
            max_blocks = min(max_blocks, self.config.max_blocks)
        return max_blocks

    def _max_blocks(self) -> int:
        one_block = self._load(0, 1, "cpu")
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
            self.device.type, f"{self.dtype}-{self.config.quant}", config_hash(self.model_config)
        )
        cached = cache.get(key)
        if cached is not None:
            return cached
        block = self._load(0, 1, self.device)
        hidden = torch.randn(1, 16, self.model_config.hidden_size, dtype=self.dtype, device=self.device)

        def step() -> None:
            with torch.inference_mode():
                block(hidden)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        value = measure_compute_throughput(step, 16, steps=5)
        cache.put(key, value)
        return value

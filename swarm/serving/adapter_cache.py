"""Clients' LoRA adapters kept on a server by content hash: for training requests and sessions.

A fine-tuning client sends its span's adapters once and names their hash afterwards
(``SpanForward`` / ``SpanBackward``); a generating client uploads them with
``PutAdapter`` and opens sessions with the hash (``OpenInference.adapter_hash``). The
``AdapterCache`` is bounded and forgets what goes unused, so a request naming a hash it
no longer holds gets ``AdapterNotCached`` and the client sends the adapters again. A
session takes its ``ServedAdapter`` when it opens and keeps it to its end, whatever the
cache does meanwhile.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.lora import adapter_hash, check_span_tensors
from kernels.model_config import ModelConfig
from swarm.serving.protocol import AdapterNotCached
from transport.errors import MalformedMessage

ADAPTER_CACHE_ENTRIES = 64  # span adapters kept at once (a few clients, a few steps each)
ADAPTER_CACHE_SECONDS = 600.0  # an adapter unused this long is dropped


@dataclass(frozen=True, eq=False)
class ServedAdapter:
    """One span's adapters on the server's device: ``tensors`` by wire name, stacked over its blocks."""

    key: bytes
    tensors: dict[str, torch.Tensor]
    scaling: float

    @property
    def blocks(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


class AdapterCache:
    """Adapters by content hash, least recently used first out, expiring when unused.

    Args:
        max_entries: entries kept at most.
        ttl: seconds an entry lives after its last use.
        clock: seconds, monotonic (injected in tests).
    """

    def __init__(
        self, max_entries: int = ADAPTER_CACHE_ENTRIES, ttl: float = ADAPTER_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self.max_entries, self.ttl, self.clock = max_entries, ttl, clock
        self._entries: OrderedDict[bytes, tuple[float, ServedAdapter]] = OrderedDict()

    def put(self, adapter: ServedAdapter) -> None:
        self._expire()
        self._entries[adapter.key] = (self.clock(), adapter)
        self._entries.move_to_end(adapter.key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, key: bytes) -> ServedAdapter | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries[key] = (self.clock(), entry[1])
        self._entries.move_to_end(key)
        return entry[1]

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()
        for key in [key for key, (used, _) in self._entries.items() if now - used > self.ttl]:
            del self._entries[key]


class AdapterStore:
    """Validates adapters from the network, keeps them in an ``AdapterCache``, finds them by hash.

    Args:
        model_config: the served model (the adapters' shapes are checked against it).
        device, dtype: where and how the adapters are kept.
    """

    def __init__(self, model_config: ModelConfig, device, dtype, cache: AdapterCache | None = None):
        self.model_config, self.device, self.dtype = model_config, device, dtype
        self.cache = cache or AdapterCache()

    def add(
        self, tensors: dict[str, torch.Tensor], scaling: float, n_blocks: int, named: bytes = b""
    ) -> ServedAdapter:
        """Checks and keeps a span's adapters.

        Raises:
            MalformedMessage: wrong names or shapes, non-finite values, or ``named`` is not their hash.
        """
        try:
            check_span_tensors(self.model_config, tensors, n_blocks)
        except ValueError as error:
            raise MalformedMessage(f"adapters: {error}") from error
        key = adapter_hash(tensors, scaling)
        if named and named != key:
            raise MalformedMessage("adapter_hash does not match the adapters sent")
        on_device = {name: t.to(self.device, self.dtype) for name, t in tensors.items()}
        adapter = ServedAdapter(key, on_device, scaling)
        self.cache.put(adapter)
        return adapter

    def find(self, key: bytes, n_blocks: int) -> ServedAdapter:
        """The adapters of hash ``key`` for a span of ``n_blocks`` blocks.

        Raises:
            AdapterNotCached: not held (any more): the client sends them again.
            MalformedMessage: they cover another number of blocks.
        """
        adapter = self.cache.get(key)
        if adapter is None:
            raise AdapterNotCached("this server does not hold that adapter (any more): send it")
        if adapter.blocks != n_blocks:
            raise MalformedMessage(f"the cached adapter covers {adapter.blocks} blocks, not {n_blocks}")
        return adapter

    def of_request(self, request, n_blocks: int) -> ServedAdapter | None:
        """A training request's adapters (sent or named by hash), or None without any."""
        if request.adapters:
            return self.add(request.adapters, request.lora_scaling, n_blocks, request.adapter_hash)
        if not request.adapter_hash:
            return None
        return self.find(request.adapter_hash, n_blocks)

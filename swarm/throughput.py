"""Measuring what a server can do: compute per block, network bandwidth, and the cache of both.

Compute is measured by timing a caller-supplied forward step, so this module knows
nothing about models. Network bandwidth is measured by timing a caller-supplied transfer
to a real peer (the transport provides one); without a peer we do not pretend — a
loopback transfer measures memcpy, not the internet — and the configured value is used
instead (``--bandwidth-mbps``). Results are cached in a JSON file keyed by device,
dtype and model hash, as Petals does, because measuring at every start costs time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from transport.errors import ConfigurationError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


def measure_compute_throughput(
    forward_step: Callable[[], object],
    tokens_per_step: int,
    *,
    warmup_steps: int = 2,
    steps: int = 10,
    clock: Clock = time.perf_counter,
) -> float:
    """Times ``forward_step`` (one block, ``tokens_per_step`` tokens) and returns tokens/s.

    Args:
        forward_step: runs one forward pass through one block and waits for it to finish
            (call ``torch.cuda.synchronize()`` inside on GPU).
        tokens_per_step: tokens processed by one call.
        warmup_steps: untimed calls first (allocator, kernels, caches).
        steps: timed calls.
        clock: seconds (inject a fake one in tests).

    Returns:
        Tokens per second through one block.

    Raises:
        ConfigurationError: ``steps`` or ``tokens_per_step`` below 1.
        RuntimeError: the timed steps took no measurable time.
    """
    if steps < 1 or tokens_per_step < 1:
        raise ConfigurationError("throughput measurement needs steps >= 1 and tokens_per_step >= 1")
    for _ in range(warmup_steps):
        forward_step()
    started = clock()
    for _ in range(steps):
        forward_step()
    elapsed = clock() - started
    if elapsed <= 0:
        raise RuntimeError("forward steps took no measurable time; raise `steps`")
    return steps * tokens_per_step / elapsed


def measure_transfer_bandwidth(
    transfer: Callable[[int], object],
    nbytes: int = 4 * 2**20,
    *,
    repeats: int = 3,
    clock: Clock = time.perf_counter,
) -> float:
    """Times ``transfer(nbytes)`` (send to a peer and wait for its acknowledgement).

    Args:
        transfer: moves ``nbytes`` to a peer and returns when the peer confirmed receipt.
        nbytes: bytes per transfer (large enough that round-trip latency is minor).
        repeats: transfers; the fastest counts (others were disturbed by cross traffic).
        clock: seconds.

    Returns:
        Bytes per second.

    Raises:
        ConfigurationError: ``nbytes`` or ``repeats`` below 1.
        RuntimeError: a transfer took no measurable time.
    """
    if nbytes < 1 or repeats < 1:
        raise ConfigurationError("bandwidth measurement needs nbytes >= 1 and repeats >= 1")
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        transfer(nbytes)
        best = min(best, clock() - started)
    if best <= 0:
        raise RuntimeError("transfer took no measurable time; raise `nbytes`")
    return nbytes / best


def announced_throughput(
    compute_tokens_per_s: float, bandwidth_bytes_per_s: float, bytes_per_token: int
) -> float:
    """What a server announces: the slower of its compute and its network (tokens/s).

    Args:
        compute_tokens_per_s: from ``measure_compute_throughput``.
        bandwidth_bytes_per_s: measured or configured network bandwidth.
        bytes_per_token: hidden size x bytes per value on the wire (in and out counted once).
    """
    if bytes_per_token <= 0:
        raise ConfigurationError("bytes per token must be positive")
    return min(compute_tokens_per_s, bandwidth_bytes_per_s / bytes_per_token)


def throughput_cache_key(device: str, dtype: str, model_hash: str) -> str:
    """The cache key of one measurement: ``"{device}|{dtype}|{model_hash}"``."""
    return f"{device}|{dtype}|{model_hash}"


class ThroughputCache:
    """A JSON file of measurements keyed by ``throughput_cache_key``.

    Args:
        path: the cache file; created (with its folder) on first write.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable throughput cache %s: %s", self.path, error)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and v > 0}

    def get(self, key: str) -> float | None:
        """The cached value, or None."""
        return self._read().get(key)

    def put(self, key: str, value: float) -> None:
        """Stores a value (atomically: write a temporary file, then rename)."""
        data = self._read()
        data[key] = float(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, self.path)

    def get_or_measure(self, key: str, measure: Callable[[], float]) -> float:
        """Returns the cached value, or runs ``measure()`` and caches its result."""
        cached = self.get(key)
        if cached is not None:
            return cached
        value = float(measure())
        self.put(key, value)
        return value

"""Which blocks a joining server takes: fill the weakest coverage first (as Petals does).

Coverage of a block is the sum of the throughputs of the servers holding it. A server
takes as many blocks as its memory allows, at the window whose *sorted* coverage vector
is lexicographically smallest: first the window containing the weakest block, among
those the one whose second-weakest block is weakest, and so on.

A relayed server (behind NAT, reached through libp2p) counts at
``RELAYED_THROUGHPUT_FACTOR`` of its throughput (Petals, PR #428: 0.2): its blocks look
weaker, so direct servers go there first, yet a block only it covers is still covered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from swarm.records import ServerRecord, ServerState
from swarm.spans import Span
from transport.errors import ConfigurationError

# States that count towards coverage when choosing: a JOINING server is already on its way
# to those blocks, so a second joiner should not pick the same gap.
PLANNED_STATES = frozenset({ServerState.JOINING, ServerState.ONLINE})

RELAYED_THROUGHPUT_FACTOR = 0.2
"""Share of a relayed server's throughput that counts as coverage (every hop crosses a relay)."""


def effective_throughput(server: ServerRecord) -> float:
    """The throughput ``server`` contributes to coverage (relayed servers count at a fraction)."""
    return server.throughput * (RELAYED_THROUGHPUT_FACTOR if server.relayed else 1.0)


def compute_coverage(
    starts: Sequence[int] | np.ndarray,
    ends: Sequence[int] | np.ndarray,
    throughputs: Sequence[float] | np.ndarray,
    n_blocks: int,
) -> np.ndarray:
    """Sums throughputs per block over half-open spans ``[starts[i], ends[i])``.

    Args:
        starts, ends, throughputs: one entry per server.
        n_blocks: number of blocks in the model; spans are clipped to it.

    Returns:
        ``(n_blocks,)`` float64 coverage.
    """
    starts = np.clip(np.asarray(starts, dtype=np.int64), 0, n_blocks)
    ends = np.clip(np.asarray(ends, dtype=np.int64), 0, n_blocks)
    throughputs = np.asarray(throughputs, dtype=np.float64)
    delta = np.zeros(n_blocks + 1)
    np.add.at(delta, starts, throughputs)
    np.add.at(delta, ends, -throughputs)
    return np.cumsum(delta[:n_blocks])


def coverage_from_records(
    servers: Iterable[ServerRecord],
    n_blocks: int,
    *,
    exclude: Iterable[str] = (),
    states: frozenset[ServerState] = PLANNED_STATES,
) -> np.ndarray:
    """Coverage of ``[0, n_blocks)`` by the servers in ``states``, except ``exclude`` (by peer id)."""
    excluded = set(exclude)
    chosen = [s for s in servers if s.state in states and s.peer_id not in excluded]
    return compute_coverage(
        [s.span.start for s in chosen],
        [s.span.end for s in chosen],
        [effective_throughput(s) for s in chosen],
        n_blocks,
    )


def choose_span(coverage: np.ndarray, max_blocks: int) -> Span:
    """The window of ``min(max_blocks, n_blocks)`` blocks whose sorted coverage is smallest.

    Ties go to the lowest start.

    Args:
        coverage: ``(n_blocks,)`` coverage of the swarm *without* this server.
        max_blocks: how many blocks fit in this server's memory.

    Returns:
        The span to serve.

    Raises:
        ConfigurationError: ``max_blocks < 1``.
    """
    if max_blocks < 1:
        raise ConfigurationError(f"a server must hold at least one block (memory allows {max_blocks})")
    n_blocks = len(coverage)
    length = min(max_blocks, n_blocks)
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(coverage, length), axis=1)
    # (n_windows, length): lexsort's last key is the primary one, so feed columns reversed.
    best = int(np.lexsort(windows.T[::-1])[0])
    return Span(best, best + length)


def max_blocks_for_memory(free_bytes: int, bytes_per_block: int, cache_bytes_per_block: int = 0) -> int:
    """How many blocks (weights plus attention cache) fit in ``free_bytes``.

    Raises:
        ConfigurationError: not even one block fits.
    """
    per_block = bytes_per_block + cache_bytes_per_block
    if per_block <= 0:
        raise ConfigurationError("bytes per block must be positive")
    blocks = free_bytes // per_block
    if blocks < 1:
        raise ConfigurationError(
            f"{free_bytes / 2**30:.1f} GiB free holds no block ({per_block / 2**30:.2f} GiB each); "
            "lower --cache-tokens or use a smaller --dtype"
        )
    return int(blocks)

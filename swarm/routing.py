"""Choosing the chain of servers a client streams hidden states through.

Nodes are block boundaries ``0..n``; using server ``s`` from block ``i`` is an edge
``i -> min(s.end, target_end)`` (a route stays on a server to the end of its span, as in
Petals, so each server adds at most ``len(span)`` edges). The client sends hidden states
to each server in turn, so an edge costs one client round trip to that server plus the
compute of its blocks, slowed by its queue, plus a heavy penalty when it has no cache
room for the session. Dijkstra finds the cheapest chain.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Collection, Iterable, Mapping

from swarm.records import ServerRecord, ServerState
from swarm.spans import Span
from swarm.swarm_errors import NoRouteError
from transport.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """How routes are scored.

    Attributes:
        default_rtt: round-trip seconds assumed for a server the client has not measured.
        tokens_per_step: tokens per inference step (1 while generating, more for prefill).
        load_weight: each request queued at a server adds this many of its step times.
        cache_penalty: seconds added for a server without cache room for the session
            (Petals: 10 s), so it is used only when nothing else covers those blocks.
        exclude_without_cache: drop such servers entirely instead.
        relay_penalty: seconds added to each hop through a relayed server (behind NAT),
            so routes prefer direct servers and use relayed ones for blocks nobody
            else covers (or when they are much faster).
    """

    default_rtt: float = 0.1
    tokens_per_step: int = 1
    load_weight: float = 1.0
    cache_penalty: float = 10.0
    exclude_without_cache: bool = False
    relay_penalty: float = 0.05

    def __post_init__(self) -> None:
        if (
            self.default_rtt < 0
            or self.tokens_per_step < 1
            or self.load_weight < 0
            or self.cache_penalty < 0
            or self.relay_penalty < 0
        ):
            raise ConfigurationError(
                "routing: rtt, load weight and penalty must be >= 0; tokens per step >= 1"
            )


@dataclasses.dataclass(frozen=True)
class RouteHop:
    """One server of a route and the blocks it runs for this route.

    Attributes:
        server: the server's record (addresses, CURVE key, ...).
        span: the blocks it computes, a sub-span of ``server.span``.
        cost: estimated seconds this hop adds per step.
    """

    server: ServerRecord
    span: Span
    cost: float

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def estimate_hop_seconds(
    server: ServerRecord,
    n_blocks: int,
    config: RoutingConfig,
    rtt: float,
    session_tokens: int,
) -> float:
    """Estimated seconds per step for running ``n_blocks`` blocks on ``server``."""
    per_block = 1.0 / server.inference_rate + (config.tokens_per_step - 1) / server.throughput
    seconds = rtt + n_blocks * per_block * (1.0 + config.load_weight * server.load)
    if server.free_cache_tokens < session_tokens:
        seconds += config.cache_penalty
    if server.relayed:
        seconds += config.relay_penalty
    return seconds


def _uncovered(servers: Iterable[ServerRecord], start: int, end: int) -> list[tuple[int, int]]:
    covered = [False] * (end - start)
    for server in servers:
        for block in range(max(server.span.start, start), min(server.span.end, end)):
            covered[block - start] = True
    ranges: list[tuple[int, int]] = []
    for offset, is_covered in enumerate(covered):
        if not is_covered:
            if ranges and ranges[-1][1] == start + offset:
                ranges[-1] = (ranges[-1][0], start + offset + 1)
            else:
                ranges.append((start + offset, start + offset + 1))
    return ranges


def find_route(
    servers: Iterable[ServerRecord],
    start: int,
    end: int,
    *,
    config: RoutingConfig = RoutingConfig(),
    client_rtts: Mapping[str, float] | None = None,
    session_tokens: int = 0,
    excluded: Collection[str] = frozenset(),
) -> list[RouteHop]:
    """The fastest chain of servers covering blocks ``[start, end)``.

    Use ``start=0, end=n_blocks`` for a new session, or the failed server's sub-span with
    ``excluded=ban_list.banned()`` to replace it.

    Args:
        servers: server records (from ``SwarmDHT.list_servers``); only ONLINE ones are used.
        start, end: the blocks to cover, half-open.
        config: scoring parameters.
        client_rtts: measured round-trip seconds from this client, by peer id.
        session_tokens: attention-cache tokens the session needs on every server.
        excluded: peer ids not to use (banned, or already failed).

    Returns:
        Hops in block order; their spans tile ``[start, end)`` exactly.

    Raises:
        ValueError: ``start >= end`` or ``start < 0``.
        NoRouteError: some blocks are covered by no eligible server (named in the error).
    """
    if start < 0 or end <= start:
        raise ValueError(f"cannot route blocks {start}:{end}")
    client_rtts = client_rtts or {}
    excluded = frozenset(excluded)
    all_online = [s for s in servers if s.state == ServerState.ONLINE]
    eligible = [
        s
        for s in all_online
        if s.peer_id not in excluded
        and s.throughput > 0
        and s.inference_rate > 0
        and not (config.exclude_without_cache and s.free_cache_tokens < session_tokens)
    ]
    edges: dict[int, list[tuple[int, float, ServerRecord]]] = {}
    for server in eligible:
        exit_block = min(server.span.end, end)
        rtt = client_rtts.get(server.peer_id, config.default_rtt)
        for block in range(max(server.span.start, start), exit_block):
            cost = estimate_hop_seconds(server, exit_block - block, config, rtt, session_tokens)
            edges.setdefault(block, []).append((exit_block, cost, server))

    best: dict[int, float] = {start: 0.0}
    previous: dict[int, tuple[int, ServerRecord, float]] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        distance, node = heapq.heappop(queue)
        if node == end:
            break
        if distance > best.get(node, float("inf")):
            continue
        for target, cost, server in edges.get(node, ()):
            candidate = distance + cost
            if candidate < best.get(target, float("inf")):
                best[target] = candidate
                previous[target] = (node, server, cost)
                heapq.heappush(queue, (candidate, target))

    if end not in best:
        uncovered = _uncovered(eligible, start, end)
        skipped = len(all_online) - len(eligible)
        detail = f"{skipped} online server(s) excluded: banned or without cache room" if skipped else ""
        raise NoRouteError(uncovered or [(start, end)], detail)
    hops: list[RouteHop] = []
    node = end
    while node != start:
        source, server, cost = previous[node]
        hops.append(RouteHop(server, Span(source, node), cost))
        node = source
    return hops[::-1]

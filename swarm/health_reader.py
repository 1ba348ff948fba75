"""Reads a ``SwarmView`` (model, servers, training runs) from the DHT for the health snapshot, with deadlines.

Two lookups: first the model record and the run index (to learn how many blocks and
which runs exist), then every block key and run key in one batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from swarm.health import MAX_BLOCKS, SwarmView
from swarm.records import PeerValue, block_key, choose_model_record, model_key, parse_server_listings
from swarm.training.progress import MAX_RUNS, parse_run_index, parse_run_listing, run_index_key, run_key
from transport.errors import DeadlineExceeded


class _Lister(Protocol):
    async def list_many(
        self, keys: Sequence[str], *, timeout: float | None = None
    ) -> Mapping[str, Mapping[str, PeerValue]]: ...


def _values(listing: Mapping[str, PeerValue]) -> dict[str, Any]:
    return {str(peer): item.value for peer, item in listing.items()}


async def read_swarm_view(dht: _Lister, swarm: str, *, runs: Sequence[str] = (), timeout: float) -> SwarmView:
    """Reads what the health page shows from the DHT.

    Args:
        dht: a ``SwarmDHT`` (anything with ``list_many``).
        swarm: the swarm name (key namespace).
        runs: run names to read besides those found in the run index (``--run``).
        timeout: deadline for the whole read, in seconds.

    Returns:
        The parsed view; malformed records are skipped.

    Raises:
        DeadlineExceeded: the DHT did not answer in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def remaining() -> float:
        left = deadline - loop.time()
        if left <= 0:
            raise DeadlineExceeded(f"reading the swarm view took longer than {timeout:.1f}s")
        return left

    first = await dht.list_many([model_key(swarm), run_index_key(swarm)], timeout=remaining())
    model = choose_model_record(_values(first.get(model_key(swarm), {})))
    run_names = sorted(
        set(runs) | set(parse_run_index(_values(first.get(run_index_key(swarm), {})).values()))
    )
    run_names = run_names[:MAX_RUNS]
    n_blocks = min(model.n_blocks, MAX_BLOCKS) if model is not None else 0
    block_keys = [block_key(swarm, block) for block in range(n_blocks)]
    run_keys = {name: run_key(swarm, name) for name in run_names}
    second = await dht.list_many(block_keys + list(run_keys.values()), timeout=remaining())
    servers = parse_server_listings(second.get(key, {}) for key in block_keys)
    members = {name: parse_run_listing(_values(second.get(key, {}))) for name, key in run_keys.items()}
    return SwarmView(
        swarm=swarm,
        model=model,
        servers=servers,
        runs=members,
        n_blocks_clipped=model is not None and model.n_blocks > MAX_BLOCKS,
    )

"""Reads a ``SwarmView`` (model, servers, training runs) from the DHT for the health snapshot, with deadlines and caps.

First the model record and the run index (to learn how many blocks and which runs
exist), then every block key and run key, :data:`KEYS_PER_LOOKUP` keys per lookup.

At scale (1,000 servers over 80 blocks are ~10,000 signed block entries per read, each
returned by several DHT nodes) the read's cost is checking signatures: ~0.1-0.3 ms
each. :class:`CachingRecordValidator` remembers the records it already verified, so a
reader that re-reads every few seconds only verifies what changed since.

A hostile swarm must not make the page hold unbounded data: at most
:data:`MAX_SERVERS_PER_BLOCK` entries per block and :data:`MAX_SERVERS` servers are
taken, and a record whose encoding exceeds :data:`MAX_RECORD_BYTES` is dropped; what was
left out is counted in ``SwarmView.dropped`` (``limits`` in ``/api/state``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgpack
from hivemind.dht.validation import DHTRecord

from swarm.health import MAX_BLOCKS, SwarmView
from swarm.identity import PeerId
from swarm.records import (
    PeerValue,
    ServerRecord,
    block_key,
    choose_model_record,
    key_binding_error,
    model_key,
)
from swarm.server_reports import count_reporters, reports_key
from swarm.signing import SwarmRecordValidator
from swarm.swarm_errors import MalformedRecord
from swarm.training.progress import MAX_RUNS, parse_run_index, parse_run_listing, run_index_key, run_key
from transport.errors import DeadlineExceeded

MAX_SERVERS_PER_BLOCK = 2048
"""Entries taken per block key (a public swarm has tens to hundreds)."""
MAX_SERVERS = 8192
"""Servers taken in all; past this, the page would no longer read anyway."""
MAX_RECORD_BYTES = 4096
"""Largest server record taken (msgpack size); an honest one is ~300-900 bytes."""
KEYS_PER_LOOKUP = 8
"""Block keys per DHT lookup: one answer carries every entry of its keys, and hivemind drops
answers slower than its RPC timeout (3 s), so a 1,000-server swarm is read in slices."""
VERIFIED_CACHE_SIZE = 1 << 16
"""Verified records remembered (16-byte digests): a 1,000-server, 80-block swarm needs ~10,000."""


class CachingRecordValidator(SwarmRecordValidator):
    """``SwarmRecordValidator`` that remembers which exact records it already accepted.

    A record is accepted again without a signature check when its key, subkey, value
    and expiration are byte-identical to one accepted before (a re-read of an unchanged
    record). Acceptance only grows easier with time (the one time-dependent check is
    "expiration not too far ahead"), so a cached acceptance stays correct. Refusals are
    not cached. Least recently used digests are forgotten past ``cache_size``.
    """

    def __init__(self, *args: Any, cache_size: int = VERIFIED_CACHE_SIZE, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size

    def validate(self, record: DHTRecord) -> bool:
        digest = hashlib.blake2b(
            msgpack.packb([record.key, record.subkey, record.value, float(record.expiration_time)]),
            digest_size=16,
        ).digest()
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        if not super().validate(record):
            return False
        self._verified[digest] = None
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return True


class _Lister(Protocol):
    async def list_many(
        self, keys: Sequence[str], *, timeout: float | None = None
    ) -> Mapping[str, Mapping[str, PeerValue]]: ...


def _values(listing: Mapping[str, PeerValue]) -> dict[str, Any]:
    return {str(peer): item.value for peer, item in listing.items()}


def _optional(wire: Mapping[str, Any], name: str, types: tuple[type, ...]) -> Any:
    value = wire.get(name)
    if isinstance(value, bool) and bool not in types:
        return None
    return value if isinstance(value, types) else None


def read_servers(
    listings: Sequence[Mapping[str, PeerValue]],
) -> tuple[dict[PeerId, ServerRecord], dict[PeerId, dict[str, Any]], int]:
    """Merges per-block listings into one record per server, within the caps.

    Like ``swarm.records.parse_server_listings`` (the latest expiration wins, tombstones,
    malformed records and records whose CURVE key is not their signer's skipped), plus the optional marks other features add to a server's
    record: ``"relayed"`` (bool, reached through a relay) and ``"reports"`` (int, signed
    misbehaviour reports). Absent marks stay absent (None); nothing is guessed.

    Returns:
        ``(servers, marks, dropped)``: records by peer id, ``{"relayed", "reports"}`` by
        peer id, and how many entries the caps left out.
    """
    latest: dict[str, PeerValue] = {}
    dropped = 0
    for listing in listings:
        items = list(listing.items())
        if len(items) > MAX_SERVERS_PER_BLOCK:
            dropped += len(items) - MAX_SERVERS_PER_BLOCK
            items = items[:MAX_SERVERS_PER_BLOCK]
        for peer_id, item in items:
            previous = latest.get(peer_id)
            if previous is None:
                if len(latest) >= MAX_SERVERS:
                    dropped += 1
                    continue
                latest[peer_id] = item
            elif item.expiration_time > previous.expiration_time:
                latest[peer_id] = item
    servers: dict[PeerId, ServerRecord] = {}
    marks: dict[PeerId, dict[str, Any]] = {}
    for peer_id, item in latest.items():
        if item.value is None:
            continue
        try:
            if len(msgpack.packb(item.value)) > MAX_RECORD_BYTES:
                dropped += 1
                continue
            record = ServerRecord.from_wire(peer_id, item.value)
        except (MalformedRecord, TypeError, ValueError, OverflowError):
            continue  # malformed: what the page cannot read, it does not show
        if key_binding_error(record) is not None:
            continue  # its CURVE key is not its signer's: no client would use it either
        servers[PeerId(peer_id)] = record
        reports = _optional(item.value, "reports", (int,))
        marks[PeerId(peer_id)] = {
            # the start-up reachability check's verdict (issue #13); else a plain "relayed" flag
            "relayed": (not record.reachability.direct)
            if record.reachability is not None
            else _optional(item.value, "relayed", (bool,)),
            "reports": reports if reports is None or reports >= 0 else None,
        }
    return servers, marks, dropped


async def read_swarm_view(dht: _Lister, swarm: str, *, runs: Sequence[str] = (), timeout: float) -> SwarmView:
    """Reads what the health page shows from the DHT.

    Args:
        dht: a ``SwarmDHT`` (anything with ``list_many``).
        swarm: the swarm name (key namespace).
        runs: run names to read besides those found in the run index (``--run``).
        timeout: deadline for the whole read, in seconds.

    Returns:
        The parsed view; malformed records are skipped, oversized ones counted in ``dropped``.

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

    first = await dht.list_many(
        [model_key(swarm), run_index_key(swarm), reports_key(swarm)], timeout=remaining()
    )
    model = choose_model_record(_values(first.get(model_key(swarm), {})))
    run_names = sorted(
        set(runs) | set(parse_run_index(_values(first.get(run_index_key(swarm), {})).values()))
    )
    run_names = run_names[:MAX_RUNS]
    n_blocks = min(model.n_blocks, MAX_BLOCKS) if model is not None else 0
    block_keys = [block_key(swarm, block) for block in range(n_blocks)]
    run_keys = {name: run_key(swarm, name) for name in run_names}
    keys = block_keys + list(run_keys.values())
    second: dict[str, Mapping[str, PeerValue]] = {}
    for start in range(0, len(keys), KEYS_PER_LOOKUP):
        second.update(await dht.list_many(keys[start : start + KEYS_PER_LOOKUP], timeout=remaining()))
    servers, marks, dropped = read_servers([second.get(key, {}) for key in block_keys])
    # Misbehaviour reports (swarm.server_reports): distinct signed reporters per server. They
    # replace whatever "reports" a server's own record claims (a server does not vouch for itself).
    reporters = count_reporters(first.get(reports_key(swarm), {}))
    for peer_id in servers:
        marks[peer_id] = {**marks.get(peer_id, {}), "reports": reporters.get(peer_id, 0)}
    members = {name: parse_run_listing(_values(second.get(key, {}))) for name, key in run_keys.items()}
    return SwarmView(
        swarm=swarm,
        model=model,
        servers=servers,
        runs=members,
        n_blocks_clipped=model is not None and model.n_blocks > MAX_BLOCKS,
        marks=marks,
        dropped=dropped,
    )

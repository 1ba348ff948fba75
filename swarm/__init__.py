"""The swarm as any member sees it: identity, DHT records, block selection, routing.

Also, by concept: ``records`` (model and server records, the DHT key layout, the one
record field parser), ``server_reports`` (signed misbehaviour reports), ``training/``
(DiLoCo; ``training.progress`` holds the training run records and the run index),
``telemetry`` (the MQTT telemetry format, encode and decode), and the health snapshot
that reads both records and telemetry: ``health`` (the ``/api/state`` document and its
schema), ``health_runs``, ``health_display`` and ``health_reader`` (the DHT read). The
processes that serve them live in ``peers``.
"""

from swarm.announcer import Announcer
from swarm.bans import BanList
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity, PeerId, load_or_create_identity, load_swarm_key, peer_id_from_public_key
from swarm.rebalance import RebalancePolicy, draw_check_delay, plan_move
from swarm.records import (
    ModelRecord,
    PeerValue,
    ServerRecord,
    ServerState,
    block_key,
    model_key,
    namespaced_key,
    server_record_entries,
)
from swarm.routing import RouteHop, RoutingConfig, find_route
from swarm.selection import choose_span, compute_coverage, coverage_from_records, max_blocks_for_memory
from swarm.signing import SwarmRecordValidator
from swarm.spans import Span, parse_span
from swarm.swarm_errors import (
    DHTStartError,
    InsecureKeyFile,
    InvalidSpan,
    MalformedRecord,
    ModelMismatch,
    NoRouteError,
    NotAuthorized,
    RecordRejected,
)
from swarm.throughput import (
    ThroughputCache,
    announced_throughput,
    measure_compute_throughput,
    measure_transfer_bandwidth,
    throughput_cache_key,
)

__all__ = [
    "Announcer",
    "BanList",
    "DHTConfig",
    "DHTStartError",
    "Identity",
    "InsecureKeyFile",
    "InvalidSpan",
    "MalformedRecord",
    "ModelMismatch",
    "ModelRecord",
    "NoRouteError",
    "NotAuthorized",
    "PeerId",
    "PeerValue",
    "RebalancePolicy",
    "RecordRejected",
    "RouteHop",
    "RoutingConfig",
    "ServerRecord",
    "ServerState",
    "Span",
    "SwarmDHT",
    "SwarmRecordValidator",
    "ThroughputCache",
    "announced_throughput",
    "block_key",
    "choose_span",
    "compute_coverage",
    "coverage_from_records",
    "draw_check_delay",
    "find_route",
    "load_or_create_identity",
    "load_swarm_key",
    "max_blocks_for_memory",
    "measure_compute_throughput",
    "measure_transfer_bandwidth",
    "model_key",
    "namespaced_key",
    "parse_span",
    "peer_id_from_public_key",
    "plan_move",
    "server_record_entries",
    "throughput_cache_key",
]


def __getattr__(name: str):
    """``swarm.connect_sync`` is ``swarm.serving.connect_sync`` (imported on first use:
    ``swarm.serving`` itself imports this package)."""
    if name == "connect_sync":
        from swarm.serving import connect_sync

        return connect_sync
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")

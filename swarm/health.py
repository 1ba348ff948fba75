"""The health snapshot: what the swarm looks like from one peer's view, as plain JSON-ready data.

Pure functions over parsed records, no network and no clock of their own. The snapshot
reads two sources: the DHT's records (``swarm.records`` for the model and servers,
``swarm.training.progress`` for training runs and the run index), which
``swarm.health_reader`` fetches into a :class:`SwarmView`; and, optionally, the peers'
MQTT telemetry (``swarm.telemetry``), which refreshes the fast-moving numbers of peers
the DHT lists. The runs part is built in ``swarm.health_runs``, the map's bands and the
coverage summary in ``swarm.health_map``, the rolling history in ``swarm.health_history``;
every string passes through ``swarm.health_display``. ``peers.health_server`` serves the result as a page,
``/api/state`` and ``/metrics``; ``peers.status`` prints it.

``/api/state`` schema (``schema`` = 1; every string from the DHT is clipped to
``swarm.health_display.MAX_TEXT`` characters; readers must HTML-escape it)::

    {
      "schema": 1,
      "swarm": str,
      "generated_at": float,          # unix time of the snapshot
      "verdict": "healthy" | "degraded" | "broken",   # worst of the model verdict and the alerts
      "sources": {"dht": bool, "dht_error": str | null,
                  "mqtt": bool, "mqtt_connected": bool, "mqtt_peers": int,
                  "mqtt_rejected": {"forged" | "replayed" | "stale" | "malformed": int}},
      "model": null | {
        "model_id": str, "config_hash": str, "n_blocks": int,
        "verdict": "healthy" | "degraded" | "broken", "reason": str,
        "blocks": [{"index": int, "servers": int, "throughput": float, "covered": bool}],
        "uncovered": [[start, end], ...]          # half-open ranges without an online server
      },
      "servers": [{
        "peer_id": str, "short_id": str, "state": str,   # joining|online|draining|offline
        "version": str, "stale_version": bool, "device": str, "dtype": str,
        "span": [start, end], "throughput": float, "inference_rate": float,
        "free_cache_tokens": int, "load": int,
        "rtts": {short_id: seconds}, "uptime": float | null, "source": "dht" | "dht+mqtt",
        "relayed": bool | null,       # record field "relayed" (reachability); null: the record does not say
        "reports": int | null         # distinct peers whose signed misbehaviour reports accuse it
                                      # (swarm.server_reports; shown, never acted on); null: not read
      }],
      "coverage": {                   # online servers per block, summarized (zeros without a model)
        "min_servers": int, "median_servers": float, "max_servers": int,
        "bottleneck_tokens_per_second": float,   # least tokens/s of any block
        "median_tokens_per_second": float,
        "thinnest": [{"index": int, "servers": int, "throughput": float,   # fewest servers first
                      "thin": bool}],     # below 75% of the median block's servers
        "min_redundancy": int           # the threshold the verdict used
      },
      "map": [{                       # servers grouped by span, ordered by span (swarm.health_map)
        "span": [start, end], "exact": bool, "servers": int,
        "states": {"online": int, "joining": int, "draining": int, "offline": int},
        "relayed": int, "reported": int,
        "cells": [int, ...],          # members holding each block of the span
        "members": [int, ...]         # indices into "servers"
      }],
      "runs": [{
        "name": str, "round": int, "members": int, "tokens_per_second": float,
        "bytes_per_round": int, "loss": float | null,
        "loss_curve": [[round, mean loss], ...], "stalled": bool,
        "seconds_since_progress": float, "hashes_agree": bool,
        "peers": [{"peer_id", "short_id", "state", "round", "loss", "tokens_per_second", "version",
                   "tokens_share"}]    # share of the active members' tokens/s, 0..1
      }],
      "history": {                    # rolling window (swarm.health_history); empty without one
        "window": float,
        "swarm": {"t": [float], "coverage_min": [int | null], "servers_online": [int],
                  "tokens_per_second": [float | null]},
        "runs": {name: {"t": [float], "loss": [float | null], "tokens_per_second": [float],
                        "members": [int], "bytes_per_round": [int]}}
      },
      "limits": {"records_dropped": int},   # entries the reader's caps left out (swarm.health_reader)
      "alerts": [{"kind": str, "severity": "error" | "warning", "message": str}]
    }

Schema 1 grew ``coverage``, ``map``, ``history``, ``limits``, the servers' ``relayed`` and
``reports`` and the run members' ``tokens_share`` (issue #21); no field changed meaning.

Alert kinds: ``no_model``, ``uncovered_blocks``, ``thin_coverage``, ``stale_version``,
``stalled_run``, ``empty_run``, ``hash_mismatch``, ``peer_offline``, ``dht_unreachable``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from packaging.version import InvalidVersion, Version

from swarm.health_display import alert, clip_text, finite, short_id
from swarm.health_history import HealthHistory
from swarm.health_map import build_bands, coverage_summary
from swarm.health_runs import RunProgressTracker, run_state
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.telemetry import PeerTelemetry
from swarm.training.progress import MAX_RUNS, TrainingPeerRecord

SCHEMA_VERSION = 1
MAX_BLOCKS = 4096
"""Most blocks we chart; a larger ``n_blocks`` in a model record is treated as hostile."""
VERDICTS = ("healthy", "degraded", "broken")


@dataclasses.dataclass(frozen=True)
class HealthThresholds:
    """When the snapshot calls something degraded or stalled.

    Attributes:
        min_redundancy: online servers per block below which coverage is "degraded"
            (one server per block works, but its loss breaks generation).
        stall_after: seconds without a new round before a run counts as stalled.
    """

    min_redundancy: int = 2
    stall_after: float = 600.0

    def __post_init__(self) -> None:
        if self.min_redundancy < 1:
            raise ValueError(f"--min-redundancy must be >= 1, got {self.min_redundancy}")
        if not self.stall_after > 0:
            raise ValueError(f"--stall-after must be positive, got {self.stall_after}")


@dataclasses.dataclass(frozen=True)
class SwarmView:
    """The parsed records one read of the DHT found.

    Attributes:
        swarm: the swarm name.
        model: the majority model record, or None.
        servers: servers by peer id.
        runs: run name -> members by peer id.
        n_blocks_clipped: the model claims more than :data:`MAX_BLOCKS` blocks.
        marks: optional per-server marks by peer id: ``{"relayed": bool | None, "reports": int | None}``.
        dropped: records the reader's caps left out.
    """

    swarm: str
    model: ModelRecord | None = None
    servers: Mapping[str, ServerRecord] = dataclasses.field(default_factory=dict)
    runs: Mapping[str, Mapping[str, TrainingPeerRecord]] = dataclasses.field(default_factory=dict)
    n_blocks_clipped: bool = False
    marks: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    dropped: int = 0


def _parse_version(text: str) -> Version | None:
    try:
        return Version(text)
    except (InvalidVersion, TypeError):
        return None


def _ranges(blocks: Iterable[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for block in sorted(blocks):
        if ranges and ranges[-1][1] == block:
            ranges[-1][1] = block + 1
        else:
            ranges.append([block, block + 1])
    return ranges


def _format_ranges(ranges: list[list[int]]) -> str:
    return ", ".join(str(start) if end - start == 1 else f"{start}..{end - 1}" for start, end in ranges)


def _merge_server(record: ServerRecord, telemetry: PeerTelemetry | None) -> tuple[ServerRecord, str, str]:
    """Overlays live fields from MQTT on a DHT record. Returns (record, state, source)."""
    if telemetry is None:
        return record, record.state.value, "dht"
    if not telemetry.online:
        return record, "offline", "dht+mqtt"
    live = telemetry.server
    if live is None:
        return record, record.state.value, "dht"
    # Membership and span stay DHT-authoritative (signed); MQTT refreshes the fast-moving numbers.
    merged = dataclasses.replace(
        record,
        state=live.state,
        throughput=live.throughput,
        inference_rate=live.inference_rate,
        free_cache_tokens=live.free_cache_tokens,
        load=live.load,
    )
    return merged, live.state.value, "dht+mqtt"


def _model_state(
    view: SwarmView, servers: list[tuple[ServerRecord, str]], thresholds: HealthThresholds
) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    alerts = []
    model = view.model
    if model is None:
        if not servers:
            return None, [alert("no_model", "error", "no peer announces a model: nothing is served")]
        alerts.append(
            alert("no_model", "error", "servers are announced but no peer announces the model record")
        )
        n_blocks = min(MAX_BLOCKS, max(record.span.end for record, _ in servers))
        model_id, config_hash = "unknown", ""
    else:
        n_blocks = min(MAX_BLOCKS, model.n_blocks)
        model_id, config_hash = model.model_id, model.config_hash
    counts = [0] * n_blocks
    throughput = [0.0] * n_blocks
    for record, state in servers:
        if state != ServerState.ONLINE.value:
            continue
        for block in range(record.span.start, min(record.span.end, n_blocks)):
            counts[block] += 1
            throughput[block] += finite(record.throughput)
    uncovered = _ranges(block for block, count in enumerate(counts) if count == 0)
    thin = _ranges(block for block, count in enumerate(counts) if 0 < count < thresholds.min_redundancy)
    if model is None:
        verdict, reason = "broken", "no model record in the DHT"
    elif uncovered:
        verdict = "broken"
        reason = f"blocks {_format_ranges(uncovered)} have no online server"
    elif thin:
        verdict = "degraded"
        reason = f"blocks {_format_ranges(thin)} have fewer than {thresholds.min_redundancy} online servers"
    else:
        verdict, reason = "healthy", f"every block has at least {thresholds.min_redundancy} online servers"
    if view.n_blocks_clipped:
        reason += f" (model claims more than {MAX_BLOCKS} blocks; only the first {MAX_BLOCKS} are shown)"
    if uncovered:
        alerts.append(
            alert("uncovered_blocks", "error", f"no online server covers blocks {_format_ranges(uncovered)}")
        )
    elif thin and model is not None:
        alerts.append(alert("thin_coverage", "warning", reason))
    state = {
        "model_id": clip_text(model_id),
        "config_hash": clip_text(config_hash),
        "n_blocks": n_blocks,
        "verdict": verdict,
        "reason": clip_text(reason, 400),
        "blocks": [
            {
                "index": block,
                "servers": counts[block],
                "throughput": throughput[block],
                "covered": counts[block] > 0,
            }
            for block in range(n_blocks)
        ],
        "uncovered": uncovered,
    }
    return state, alerts


def build_health_state(
    view: SwarmView,
    *,
    now: float,
    tracker: RunProgressTracker,
    thresholds: HealthThresholds = HealthThresholds(),
    telemetry: Mapping[str, PeerTelemetry] | None = None,
    sources: Mapping[str, Any] | None = None,
    history: HealthHistory | None = None,
) -> dict[str, Any]:
    """Builds the ``/api/state`` document (schema in the module docstring).

    Args:
        view: the records read from the DHT.
        now: current DHT (unix) time in seconds.
        tracker: remembers round progress across snapshots (for stalled runs).
        thresholds: when to call coverage degraded and runs stalled.
        telemetry: latest MQTT telemetry by peer id; overlays live fields of DHT-listed peers.
        sources: the ``sources`` entry (DHT/MQTT reachability), passed through.
        history: the rolling window; offered this snapshot, then exported into ``history``.

    Returns:
        A JSON-serializable dict.
    """
    telemetry = telemetry or {}
    alerts: list[dict[str, str]] = []
    merged_servers = []
    for peer_id, record in sorted(view.servers.items()):
        merged, state, source = _merge_server(record, telemetry.get(peer_id))
        merged_servers.append((peer_id, merged, state, source))
    model, model_alerts = _model_state(
        view, [(record, state) for _, record, state, _ in merged_servers], thresholds
    )
    alerts.extend(model_alerts)

    runs_members: dict[str, dict[str, TrainingPeerRecord]] = {
        name: dict(members) for name, members in view.runs.items()
    }
    for peer_id, item in telemetry.items():
        if item.online and item.trainer is not None and peer_id in runs_members.get(item.trainer[0], {}):
            runs_members[item.trainer[0]][peer_id] = item.trainer[1]

    versions = [record.version for _, record, _, _ in merged_servers]
    versions += [record.version for members in runs_members.values() for record in members.values()]
    parsed = [version for version in map(_parse_version, versions) if version is not None]
    newest = max(parsed, default=None)

    def is_stale(version: str) -> bool:
        parsed_version = _parse_version(version)
        return newest is not None and (parsed_version is None or parsed_version < newest)

    servers = []
    for peer_id, record, state, source in merged_servers:
        marks = view.marks.get(peer_id, {})
        servers.append(
            {
                "peer_id": clip_text(peer_id),
                "short_id": short_id(peer_id),
                "state": state,
                "version": clip_text(record.version),
                "stale_version": is_stale(record.version),
                "device": clip_text(record.device),
                "dtype": clip_text(record.dtype),
                "span": [record.span.start, record.span.end],
                "throughput": finite(record.throughput),
                "inference_rate": finite(record.inference_rate),
                "free_cache_tokens": record.free_cache_tokens,
                "load": record.load,
                "rtts": {short_id(peer): finite(rtt) for peer, rtt in list(record.next_rtts.items())[:16]},
                "uptime": max(0.0, now - record.started_at) if record.started_at > 0 else None,
                "source": source,
                # issue #13: "direct", "relayed" (behind NAT, reached through libp2p), or
                # "unknown" (a peer from before the start-up check)
                "reachability": record.reachability.mode if record.reachability else "unknown",
                "reachability_reason": clip_text(record.reachability.reason) if record.reachability else "",
                "relayed": (not record.reachability.direct) if record.reachability else marks.get("relayed"),
                "reports": marks.get("reports"),
            }
        )

    offline = [server["short_id"] for server in servers if server["state"] == "offline"]
    if offline:  # one alert for all of them: a thousand-server swarm may lose dozens at once
        alerts.append(
            alert(
                "peer_offline",
                "warning",
                f"{len(offline)} server(s) reported offline over MQTT: {', '.join(offline[:8])}"
                + (" …" if len(offline) > 8 else ""),
            )
        )
    stale_peers = [server["short_id"] for server in servers if server["stale_version"]]
    stale_peers += [
        short_id(peer)
        for members in runs_members.values()
        for peer, record in members.items()
        if is_stale(record.version)
    ]
    if stale_peers:
        shown = ", ".join(sorted(set(stale_peers))[:8])
        alerts.append(
            alert(
                "stale_version",
                "warning",
                f"{len(set(stale_peers))} peer(s) run a version older than {newest}: {shown}",
            )
        )

    runs = []
    for name in sorted(runs_members)[:MAX_RUNS]:
        run, run_alerts = run_state(name, runs_members[name], tracker, now, thresholds.stall_after)
        runs.append(run)
        alerts.extend(run_alerts)

    sources = dict(
        sources or {"dht": True, "dht_error": None, "mqtt": False, "mqtt_connected": False, "mqtt_peers": 0}
    )
    if sources.get("dht_error"):
        alerts.append(alert("dht_unreachable", "error", f"last DHT read failed: {sources['dht_error']}"))
    worst = model["verdict"] if model is not None else "broken"
    if any(alert["severity"] == "error" for alert in alerts):
        worst = "broken"
    elif worst == "healthy" and alerts:
        worst = "degraded"
    n_blocks = model["n_blocks"] if model is not None else 0
    state = {
        "schema": SCHEMA_VERSION,
        "swarm": clip_text(view.swarm),
        "generated_at": now,
        "verdict": worst,
        "sources": sources,
        "model": model,
        "servers": servers,
        "coverage": {
            **coverage_summary(model["blocks"] if model is not None else []),
            "min_redundancy": thresholds.min_redundancy,
        },
        "map": build_bands(servers, n_blocks),
        "runs": runs,
        "history": {"window": 0.0, "swarm": {}, "runs": {}},
        "limits": {"records_dropped": view.dropped},
        "alerts": alerts,
    }
    if history is not None:
        history.observe(state, now)
        state["history"] = history.to_json()
    return state

"""Prometheus gauges of the health snapshot, computed from the latest ``/api/state`` at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from swarm.health import VERDICTS


class SnapshotCollector(Collector):
    """Exposes the snapshot as ``swarm_*`` gauges (label values are escaped by prometheus_client).

    Args:
        get_state: returns the current ``/api/state`` document.
    """

    def __init__(self, get_state: Callable[[], dict[str, Any]]):
        self._get_state = get_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._get_state()
        swarm = state["swarm"]
        verdict = GaugeMetricFamily(
            "swarm_health_verdict", "1 for the current verdict", labels=["swarm", "verdict"]
        )
        for name in VERDICTS:
            verdict.add_metric([swarm, name], 1.0 if state["verdict"] == name else 0.0)
        yield verdict

        model = state["model"]
        blocks = GaugeMetricFamily("swarm_blocks", "blocks in the served model", labels=["swarm"])
        uncovered = GaugeMetricFamily(
            "swarm_uncovered_blocks", "blocks without an online server", labels=["swarm"]
        )
        block_servers = GaugeMetricFamily(
            "swarm_block_servers", "online servers per block", labels=["swarm", "block"]
        )
        block_throughput = GaugeMetricFamily(
            "swarm_block_throughput_tokens_per_second",
            "summed server throughput per block",
            labels=["swarm", "block"],
        )
        if model is not None:
            blocks.add_metric([swarm], model["n_blocks"])
            uncovered.add_metric([swarm], sum(not block["covered"] for block in model["blocks"]))
            for block in model["blocks"]:
                block_servers.add_metric([swarm, str(block["index"])], block["servers"])
                block_throughput.add_metric([swarm, str(block["index"])], block["throughput"])
        yield from (blocks, uncovered, block_servers, block_throughput)

        servers = GaugeMetricFamily("swarm_servers", "servers by state", labels=["swarm", "state"])
        counts: dict[str, int] = {}
        for server in state["servers"]:
            counts[server["state"]] = counts.get(server["state"], 0) + 1
        for name, count in sorted(counts.items()):
            servers.add_metric([swarm, name], count)
        yield servers
        per_server = {
            "load": GaugeMetricFamily(
                "swarm_server_load", "requests queued or running", labels=["swarm", "peer"]
            ),
            "throughput": GaugeMetricFamily(
                "swarm_server_throughput_tokens_per_second", "announced throughput", labels=["swarm", "peer"]
            ),
            "free_cache_tokens": GaugeMetricFamily(
                "swarm_server_free_cache_tokens",
                "attention cache a new session can get",
                labels=["swarm", "peer"],
            ),
        }
        for server in state["servers"]:
            for field, family in per_server.items():
                family.add_metric([swarm, server["peer_id"]], server[field])
        yield from per_server.values()

        per_run = {
            "round": GaugeMetricFamily("swarm_run_round", "latest outer round", labels=["swarm", "run"]),
            "members": GaugeMetricFamily("swarm_run_members", "active members", labels=["swarm", "run"]),
            "tokens_per_second": GaugeMetricFamily(
                "swarm_run_tokens_per_second", "summed training speed", labels=["swarm", "run"]
            ),
            "bytes_per_round": GaugeMetricFamily(
                "swarm_run_bytes_per_round", "bytes sent in the last all-reduce", labels=["swarm", "run"]
            ),
            "loss": GaugeMetricFamily("swarm_run_loss", "mean latest training loss", labels=["swarm", "run"]),
            "stalled": GaugeMetricFamily(
                "swarm_run_stalled", "1 if the run is stalled", labels=["swarm", "run"]
            ),
        }
        for run in state["runs"]:
            for field, family in per_run.items():
                value = run[field]
                if value is not None:
                    family.add_metric([swarm, run["name"]], float(value))
        yield from per_run.values()

        alerts = GaugeMetricFamily("swarm_alerts", "active alerts by kind", labels=["swarm", "kind"])
        alert_counts: dict[str, int] = {}
        for alert in state["alerts"]:
            alert_counts[alert["kind"]] = alert_counts.get(alert["kind"], 0) + 1
        for kind, count in sorted(alert_counts.items()):
            alerts.add_metric([swarm, kind], count)
        yield alerts

        rejected = CounterMetricFamily(
            "swarm_telemetry_rejected",
            "MQTT telemetry messages dropped, by cause (forged, replayed, stale, malformed)",
            labels=["swarm", "cause"],
        )
        for cause, count in sorted((state["sources"].get("mqtt_rejected") or {}).items()):
            rejected.add_metric([swarm, cause], count)
        yield rejected

"""`swarm join`: the process around an ``InferenceServer`` (``swarm/serving/server.py``).

Flags (generated from ``ServerConfig``, ``PeerOptions``, ``FaultConfig``), logging,
signals (SIGTERM / Ctrl-C drain), exit codes, the Prometheus collector and telemetry;
test faults are passed to the server as a hook (``peers/faults.py``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os

from prometheus_client import CollectorRegistry

from peers.daemon import RunningPeer, daemon_main, establish_reachability, register_daemon
from peers.options import configure_logging
from swarm.telemetry import server_telemetry_state

logger = logging.getLogger("swarm.join")

DESCRIPTION = """\
Serve a span of a model's transformer blocks to inference clients. With --blocks auto
the server measures its throughput (cached), reads which blocks the swarm covers
least and takes those, bounded by memory, and moves when other blocks need it more
(checked every --rebalance-period seconds on average). It prints the multiaddress others can pass
as --initial-peers, then a line starting with "ONLINE" once it serves.

Start a swarm:  swarm join --model CHECKPOINT_DIR --blocks 0:8
Join it:        swarm join --model CHECKPOINT_DIR --initial-peers MULTIADDR
Ctrl-C / SIGTERM drains: new sessions are refused, open ones get --drain-timeout
seconds to finish, records are withdrawn, exit 0 (twice to leave at once)."""


def register(subparsers) -> None:
    from swarm.serving import ServerConfig

    register_daemon(
        subparsers,
        "join",
        help="serve a span of a model's blocks for inference",
        description=DESCRIPTION,
        config_class=ServerConfig,
        handler=main,
        fault_flags=True,
    )


def check_model_arguments(model: str, blocks: str) -> None:
    """Reads the checkpoint's config and checks ``--blocks`` against it, before anything starts.

    Raises:
        OSError: no such checkpoint. ValueError: an unsupported or unreadable one.
        ConfigurationError: ``--blocks`` outside the model.
    """
    from kernels import load_config
    from swarm import parse_span

    if not os.path.exists(model):
        raise FileNotFoundError(f"--model {model}: no such file or folder")
    n_blocks = load_config(model).num_layers
    if blocks != "auto":
        parse_span(blocks, n_blocks, flag="--blocks")


async def refuse_another_model(dht, model: str) -> None:
    """Raises ModelMismatch, naming what differs, when the swarm's model record has another config.

    A record that cannot be read is no reason to stay out: every session is checked too."""
    from kernels import load_config
    from kernels.model_config import config_fingerprint, config_hash, describe_config_difference
    from swarm import ModelMismatch
    from transport.errors import SwarmError

    ours = load_config(model)
    try:
        record = await dht.get_model(timeout=30)
    except SwarmError as error:
        logger.warning("could not read the swarm's model record: %s", error)
        return
    if record is None or record.config_hash == config_hash(ours):
        return
    difference = describe_config_difference(config_fingerprint(ours), dict(record.config_fields))
    raise ModelMismatch(f"swarm {dht.swarm_name!r} serves {record.model_id!r}, whose config differs from "
                        f"{model}'s: {difference or f'config hash {record.config_hash} there, {config_hash(ours)} here'}")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from swarm.serving import ServerConfig
    from transport import Timeouts
    from transport.errors import SwarmError

    if args.model:  # an empty --model is ServerConfig's to report
        try:
            check_model_arguments(args.model, args.blocks)
        except (ValueError, OSError, SwarmError) as error:
            configure_logging(args.verbose)
            logger.error("%s", error)
            return 2

    def timeouts(config: ServerConfig) -> Timeouts:
        return Timeouts(stream_idle=config.session_idle_timeout, request=max(60.0, config.push_wait * 2))

    return daemon_main(ServerConfig, args, logger, _serve, timeouts=timeouts)


class _ServerCollector:
    """Prometheus metrics of one server, read from it at each scrape."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from swarm import ServerState

        server, stats = self.server, self.server.stats()
        span = server.span
        gauges = {
            "swarm_serve_online": ("1 while ONLINE (0 while joining, moving or draining)",
                                   float(server.state == ServerState.ONLINE)),
            "swarm_serve_first_block": ("first block of the announced span", span.start if span else -1),
            "swarm_serve_end_block": ("end (exclusive) of the announced span", span.end if span else -1),
            "swarm_serve_throughput": ("measured tokens/s per block", server.throughput),
            "swarm_serve_reachability_direct": ("1 if peers can dial us (direct), 0 if reached through relays",
                                                float(server.reachability is None or server.reachability.direct)),
            "swarm_serve_sessions": ("open inference sessions", stats.sessions),
            "swarm_serve_cache_tokens_used": ("attention-cache tokens in use", stats.cache_tokens_used),
            "swarm_serve_cache_tokens_total": ("attention-cache budget (--cache-tokens)",
                                               stats.cache_tokens_total),
        }  # fmt: skip
        for name, (documentation, value) in gauges.items():
            gauge = GaugeMetricFamily(name, documentation)
            gauge.add_metric([], value)
            yield gauge
        counters = {
            "swarm_serve_forwards": ("forward passes of inference steps", stats.forwards),
            "swarm_serve_batched_steps": ("steps that ran batched with others", stats.batched_steps),
            "swarm_serve_pushes_sent": ("outputs pushed to the next server", stats.pushes_sent),
            "swarm_serve_pushes_used": ("inputs that arrived by a push", stats.pushes_used),
            "swarm_serve_pushes_refused": (
                "pushes refused: no server of the next block at that address",
                stats.pushes_refused,
            ),
        }
        for name, (documentation, value) in counters.items():
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter


async def _serve(peer: RunningPeer) -> None:
    """Serves until stopped, then drains (``swarm.serving.serve``)."""
    from peers.cli import software_version
    from swarm.serving import InferenceServer, serve

    config, faults = peer.arguments.config, peer.arguments.faults
    await refuse_another_model(peer.dht, config.model)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    server = InferenceServer(
        config, peer.dht, peer.endpoint, peer.address, software_version(), on_step=faults.server_step_hook(),
        on_output=faults.server_output_hook(),
    )  # fmt: skip
    await _establish_reachability(server, peer)
    registry = CollectorRegistry()
    registry.register(_ServerCollector(server))
    exports, publisher = peer.exporting(
        registry, lambda: server_telemetry_state(server.record()) if server.span else {}
    )

    def online(server: InferenceServer) -> None:
        # Everything alive now (torch, hivemind, the span's modules: millions of objects) is
        # left out of the collector's full scans, each of which stalled this process's event
        # loop for ~0.4 s in the middle of a step on the 2-core VM (issue #18).
        gc.freeze()
        print(f"ONLINE serving blocks {server.span} at {peer.address} as {peer.dht.peer_id}", flush=True)
        if publisher is not None:
            publisher.notify()

    async with exports:
        await serve(server, peer.stop, online)


async def _establish_reachability(server, peer: RunningPeer) -> None:
    """The reachability check against the swarm's direct servers (``establish_reachability``)."""
    from swarm.data_plane import direct_checkers

    servers = await peer.dht.list_servers(server.model_config.num_layers, timeout=30)
    server.reachability = await establish_reachability(
        peer, direct_checkers(servers.values(), peer.dht.peer_id)
    )
    server.dht, server.relayed = peer.dht, peer.relayed

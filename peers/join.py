"""`swarm join`: the process around an ``InferenceServer`` (``swarm/serving/server.py``).

Flags (generated from ``ServerConfig``, ``PeerOptions``, ``FaultConfig``), logging,
signals (SIGTERM / Ctrl-C drain), exit codes, the Prometheus collector and telemetry;
test faults are passed to the server as a hook (``peers/faults.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from prometheus_client import CollectorRegistry

from peers.faults import FaultConfig
from peers.metrics import add_metrics_arguments, metrics_config_from_args
from peers.options import (
    PeerOptions,
    add_config_arguments,
    config_from_arguments,
    configure_logging,
    data_plane_address,
    install_stop_handlers,
    run_async,
    start_peer,
)
from peers.telemetry_publisher import (
    add_telemetry_arguments,
    daemon_publisher,
    exporting,
    telemetry_config_from_args,
)
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

    parser = subparsers.add_parser(
        "join",
        help="serve a span of a model's blocks for inference",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, ServerConfig)
    add_config_arguments(parser.add_argument_group("swarm"), PeerOptions)
    add_config_arguments(parser.add_argument_group("fault injection (tests)"), FaultConfig)
    add_metrics_arguments(parser)
    add_telemetry_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=main)


def check_model_arguments(config) -> None:
    """Reads the checkpoint's config and checks ``--blocks`` against it, before anything starts.

    Raises:
        OSError: no such checkpoint. ValueError: an unsupported or unreadable one.
        ConfigurationError: ``--blocks`` outside the model.
    """
    from kernels import load_config
    from swarm import parse_span

    if not os.path.exists(config.model):
        raise FileNotFoundError(f"--model {config.model}: no such file or folder")
    n_blocks = load_config(config.model).num_layers
    if config.blocks != "auto":
        parse_span(config.blocks, n_blocks, flag="--blocks")


async def _refuse_another_model(dht, model: str) -> str | None:
    """Why this server must not join: the swarm's model record has another config (None: it may)."""
    from kernels import load_config
    from kernels.config import config_fingerprint, config_hash, describe_config_difference

    ours = load_config(model)
    record = await dht.get_model(timeout=30)
    if record is None or record.config_hash == config_hash(ours):
        return None
    difference = describe_config_difference(config_fingerprint(ours), dict(record.config_fields))
    return (f"swarm {dht.swarm_name!r} serves {record.model_id!r}, whose config differs from {model}'s: "
            f"{difference or f'config hash {record.config_hash} there, {config_hash(ours)} here'}")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from swarm.serving import ServerConfig
    from transport.errors import SwarmError

    configure_logging(args.verbose)
    try:
        config = config_from_arguments(ServerConfig, args)
        options = config_from_arguments(PeerOptions, args)
        faults = config_from_arguments(FaultConfig, args)
        metrics = metrics_config_from_args(args)
        telemetry = telemetry_config_from_args(args)
        check_model_arguments(config)
    except (ValueError, OSError, SwarmError) as error:
        logger.error("%s", error)
        return 2
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    return run_async(lambda: _join(config, options, faults, metrics, telemetry))


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
        }
        for name, (documentation, value) in counters.items():
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter


async def _join(config, options: PeerOptions, faults: FaultConfig, metrics=None, telemetry=None) -> int:
    from peers.cli import software_version
    from swarm.serving import InferenceServer, serve
    from transport import Endpoint, Timeouts
    from transport.errors import SwarmError

    stop = asyncio.Event()
    install_stop_handlers(stop, asyncio.get_running_loop())
    try:
        identity, dht, swarm_key = await asyncio.to_thread(start_peer, options, config.record_ttl)
    except SwarmError as error:
        logger.error("could not join the swarm: %s", error)
        return 1
    try:
        refusal = await _refuse_another_model(dht, config.model)
    except SwarmError as error:  # no model record readable yet: the sessions' own check still holds
        logger.warning("could not read the swarm's model record: %s", error)
        refusal = None
    if refusal is not None:
        logger.error("%s", refusal)
        await asyncio.to_thread(dht.shutdown)
        return 2
    timeouts = Timeouts(stream_idle=config.session_idle_timeout, request=max(60.0, config.push_wait * 2))
    try:
        async with Endpoint(identity.curve_keypair(), swarm_key=swarm_key, timeouts=timeouts) as endpoint:
            bound = await endpoint.bind(f"tcp://{options.host}:{options.port}")
            address = data_plane_address(options, bound)
            for maddr in dht.visible_maddrs():
                print(f"initial peer for others: {maddr}", flush=True)
            server = InferenceServer(
                config, dht, endpoint, address, software_version(), on_step=faults.server_step_hook()
            )
            publisher = daemon_publisher(
                telemetry,
                options.swarm,
                dht,
                lambda: server_telemetry_state(server.record()) if server.span else {},
            )

            def online(server: InferenceServer) -> None:
                print(f"ONLINE serving blocks {server.span} at {address} as {dht.peer_id}", flush=True)
                if publisher is not None:
                    publisher.notify()

            registry = CollectorRegistry()
            registry.register(_ServerCollector(server))
            async with exporting(metrics, registry, publisher):
                await serve(server, stop, online)
    except (SwarmError, ValueError, OSError) as error:
        logger.error("server failed: %s", error)
        return 1
    finally:
        await asyncio.to_thread(dht.shutdown)
    logger.info("left the swarm")
    return 0

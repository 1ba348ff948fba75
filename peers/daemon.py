"""One runner for the two peer daemons, `swarm join` and `swarm train`.

Both start the same way and differ only in the work they do once they are in the
swarm. This module owns what they share:

- the flags: the daemon's own config dataclass, ``PeerOptions``, ``FaultConfig`` (test
  faults, where they apply), ``/metrics`` and MQTT telemetry (:func:`add_daemon_arguments`), parsed back into
  :class:`DaemonArguments` with exit code 2 and one clear line for a bad value;
- logging and the event loop (:func:`run_daemon`);
- start-up: signals (first Ctrl-C / SIGTERM drains, a second one exits), the identity
  and DHT node, the data-plane endpoint and the address to announce, the
  ``initial peer for others`` lines;
- shut-down: the DHT node is stopped whatever happens; swarm errors become exit code 1.

A daemon is a coroutine ``work(peer: RunningPeer) -> None`` that returns when
``peer.stop`` is set and its work is drained.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from peers.faults import FaultConfig
from peers.metrics import MetricsConfig, add_metrics_arguments, metrics_config_from_args
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
    TelemetryConfig,
    add_telemetry_arguments,
    daemon_publisher,
    exporting,
    telemetry_config_from_args,
)


def register_daemon(
    subparsers,
    name: str,
    *,
    help: str,
    description: str,
    config_class: type,
    handler: Callable[[argparse.Namespace], int],
    fault_flags: bool = False,
) -> argparse.ArgumentParser:
    """Adds the daemon's subcommand with its flags (:func:`add_daemon_arguments`) and handler."""
    parser = subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_daemon_arguments(parser, config_class, fault_flags=fault_flags)
    parser.set_defaults(handler=handler)
    return parser


def add_daemon_arguments(
    parser: argparse.ArgumentParser, config_class: type, *, fault_flags: bool = False
) -> None:
    """Adds the daemon's own flags (from ``config_class``) and the ones every daemon shares.

    ``fault_flags`` adds ``FaultConfig``'s test flags (for the daemons they apply to).
    """
    add_config_arguments(parser, config_class)
    add_config_arguments(parser.add_argument_group("swarm"), PeerOptions)
    if fault_flags:
        add_config_arguments(parser.add_argument_group("fault injection (tests)"), FaultConfig)
    add_metrics_arguments(parser)
    add_telemetry_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


@dataclass(frozen=True)
class DaemonArguments:
    """Everything a daemon was asked to do, validated.

    Attributes:
        config: the daemon's own config (``ServerConfig`` or ``TrainerConfig``).
        options: how this peer joins the swarm.
        faults: failures to inject (tests only; all off by default).
        metrics: ``--metrics-port``'s ``/metrics`` server, or None.
        telemetry: ``--mqtt``'s publisher settings, or None.
    """

    config: Any
    options: PeerOptions
    faults: FaultConfig = field(default_factory=FaultConfig)
    metrics: MetricsConfig | None = None
    telemetry: TelemetryConfig | None = None


@dataclass
class RunningPeer:
    """A daemon's place in the swarm, handed to its work once start-up is done.

    Attributes:
        identity: this peer's key pair.
        dht: its DHT node (stopped by the runner on the way out).
        endpoint: its data-plane endpoint, bound.
        address: the data-plane address others dial (``--announce-host`` applied).
        stop: set by the first SIGINT / SIGTERM.
        arguments: what the daemon was started with.
    """

    identity: Any
    dht: Any
    endpoint: Any
    address: str
    stop: asyncio.Event
    arguments: DaemonArguments

    def exporting(self, registry, snapshot: Callable[[], dict]):
        """``/metrics`` (from ``registry``) and MQTT telemetry (from ``snapshot()``) around the work.

        Returns ``(context manager, publisher or None)``; call ``publisher.notify()`` on a change.
        """
        arguments = self.arguments
        publisher = daemon_publisher(arguments.telemetry, arguments.options.swarm, self.dht, snapshot)
        return exporting(arguments.metrics, registry, publisher), publisher


def parse_daemon_arguments(
    config_class: type, args: argparse.Namespace, logger: logging.Logger
) -> DaemonArguments | None:
    """Builds :class:`DaemonArguments` from parsed flags; logs the bad flag and returns None."""
    try:
        return DaemonArguments(
            config=config_from_arguments(config_class, args),
            options=config_from_arguments(PeerOptions, args),
            faults=config_from_arguments(FaultConfig, args),
            metrics=metrics_config_from_args(args),
            telemetry=telemetry_config_from_args(args),
        )
    except ValueError as error:
        logger.error("%s", error)
        return None


def daemon_main(
    config_class: type,
    args: argparse.Namespace,
    logger: logging.Logger,
    work: Callable[[RunningPeer], Awaitable[None]],
    *,
    timeouts: Callable[[Any], Any] | None = None,
) -> int:
    """The whole life of a daemon process; returns its exit code.

    Args:
        config_class: the daemon's config dataclass (its fields are flags).
        args: the parsed command line.
        logger: the daemon's logger (errors are reported through it).
        work: runs the daemon once it is in the swarm; returns after ``peer.stop`` and draining.
        timeouts: builds the endpoint's ``transport.Timeouts`` from the config (default: the
            transport's defaults).

    Returns:
        0 after a clean stop, 1 when joining or serving failed, 2 for a bad flag.
    """
    configure_logging(args.verbose)
    arguments = parse_daemon_arguments(config_class, args, logger)
    if arguments is None:
        return 2
    return run_async(lambda: run_daemon(arguments, logger, work, timeouts=timeouts))


async def run_daemon(
    arguments: DaemonArguments,
    logger: logging.Logger,
    work: Callable[[RunningPeer], Awaitable[None]],
    *,
    timeouts: Callable[[Any], Any] | None = None,
) -> int:
    """Starts the peer (identity, DHT, endpoint), runs ``work`` and always stops the DHT.

    Returns:
        0 after ``work`` returned, 1 when the swarm could not be joined or ``work`` failed
        with a swarm, value or OS error (logged on one line).
    """
    from transport import Endpoint
    from transport.errors import SwarmError

    config, options = arguments.config, arguments.options
    stop = asyncio.Event()
    install_stop_handlers(stop, asyncio.get_running_loop())
    try:
        identity, dht, swarm_key = await asyncio.to_thread(start_peer, options, config.record_ttl)
    except SwarmError as error:
        logger.error("could not join the swarm: %s", error)
        return 1
    endpoint_timeouts = {} if timeouts is None else {"timeouts": timeouts(config)}
    try:
        async with Endpoint(identity.curve_keypair(), swarm_key=swarm_key, **endpoint_timeouts) as endpoint:
            bound = await endpoint.bind(f"tcp://{options.host}:{options.port}")
            address = data_plane_address(options, bound)
            for maddr in dht.visible_maddrs():
                print(f"initial peer for others: {maddr}", flush=True)
            await work(RunningPeer(identity, dht, endpoint, address, stop, arguments))
    except (SwarmError, ValueError, OSError) as error:
        logger.error("stopped by an error: %s", error)
        return 1
    finally:
        await asyncio.to_thread(dht.shutdown)
    logger.info("left the swarm")
    return 0

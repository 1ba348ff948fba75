"""One runner for the two peer daemons, `swarm join` and `swarm train`.

Both start the same way and differ only in the work they do once they are in the
swarm. This module owns what they share:

- the flags: the daemon's own config dataclass, ``PeerOptions``, ``FaultConfig`` (test
  faults, where they apply), ``/metrics`` and MQTT telemetry (:func:`add_daemon_arguments`), parsed back into
  :class:`DaemonArguments` with exit code 2 and one clear line for a bad value;
- logging and the event loop (:func:`run_daemon`);
- start-up: the open-file limit raised to its hard limit (connection floods), signals
  (first Ctrl-C / SIGTERM drains, a second one exits), the identity
  and DHT node, the data-plane endpoint and the address to announce, the
  ``initial peer for others`` lines; the reachability check, which the work calls once
  it knows whom to ask (:func:`establish_reachability`: behind NAT it restarts the DHT
  so it takes a relay reservation, and opens the libp2p plane);
- shut-down: the DHT node is stopped whatever happens; swarm errors become exit code 1.

A daemon is a coroutine ``work(peer: RunningPeer) -> None`` that returns when
``peer.stop`` is set and its work is drained.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
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
    reachability_config,
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
        dht: its DHT node (the work may replace it; the runner stops whichever is here at the end).
        endpoint: its data-plane endpoint, bound.
        address: the data-plane address others dial (``--announce-host`` applied).
        stop: set by the first SIGINT / SIGTERM.
        arguments: what the daemon was started with.
        swarm_key: the private swarm's key, or None in a public swarm.
        relayed: behind NAT, the libp2p plane others reach this peer through.
    """

    identity: Any
    dht: Any
    endpoint: Any
    address: str
    stop: asyncio.Event
    arguments: DaemonArguments
    swarm_key: bytes | None = None
    relayed: Any = None
    """Behind NAT: the libp2p plane (``swarm.data_plane.RelayedPlane``) that
    :func:`establish_reachability` opened; the runner closes it."""

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
        options = config_from_arguments(PeerOptions, args)
        reachability_config(options)  # a bad --reachability fails here, before the DHT starts
        return DaemonArguments(
            config=config_from_arguments(config_class, args),
            options=options,
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
    raise_descriptor_limit(logger)
    stop = asyncio.Event()
    install_stop_handlers(stop, asyncio.get_running_loop())
    try:
        identity, dht, swarm_key = await asyncio.to_thread(start_peer, options, config.record_ttl)
    except SwarmError as error:
        logger.error("could not join the swarm: %s", error)
        return 1
    endpoint_timeouts = {} if timeouts is None else {"timeouts": timeouts(config)}
    peer = None
    try:
        async with Endpoint(identity.curve_keypair(), swarm_key=swarm_key, **endpoint_timeouts) as endpoint:
            bound = await endpoint.bind(f"tcp://{options.host}:{options.port}")
            address = data_plane_address(options, bound)
            for maddr in dht.visible_maddrs():
                print(f"initial peer for others: {maddr}", flush=True)
            peer = RunningPeer(identity, dht, endpoint, address, stop, arguments, swarm_key)
            await work(peer)
    except (SwarmError, ValueError, OSError) as error:
        logger.error("stopped by an error: %s", error)
        return 1
    finally:
        if peer is not None and peer.relayed is not None:
            await peer.relayed.endpoint.close()
        await asyncio.to_thread((dht if peer is None else peer.dht).shutdown)
    logger.info("left the swarm")
    return 0


async def establish_reachability(peer: RunningPeer, checkers: list[tuple[str, bytes]]):
    """Asks ``checkers`` (direct peers already in the swarm) to dial us back; behind NAT,
    opens the libp2p plane others reach us through (``peer.relayed``). Prints the verdict.

    With ``--reachability auto`` and a "relayed" verdict the DHT node is restarted (same
    identity) told it is unreachable, so its daemon takes a relay reservation now rather
    than when its own AutoNAT agrees (minutes later): ``peer.dht`` is then a new node.

    Returns:
        the verdict (``swarm.reachability.Reachability``).
    """
    from swarm.data_plane import establish_reachability as check_and_serve
    from swarm.data_plane import open_relayed_plane

    options, config = peer.arguments.options, peer.arguments.config
    verdict, _ = await check_and_serve(
        peer.dht,
        peer.endpoint,
        peer.address,
        checkers,
        reachability_config(options),
        swarm_key=peer.swarm_key,
        open_relayed=False,
    )
    print(f"reachability: {verdict.mode} ({verdict.reason})", flush=True)
    if verdict.direct:
        return verdict
    if options.reachability == "auto":
        await asyncio.to_thread(peer.dht.shutdown)
        relayed_options = replace(options, reachability="relayed")
        _, peer.dht, _ = await asyncio.to_thread(
            start_peer, relayed_options, config.record_ttl, False, peer.identity
        )
    peer.relayed = await open_relayed_plane(
        peer.dht, swarm_key=peer.swarm_key, timeouts=peer.endpoint.timeouts
    )
    print(f"reached through libp2p as {peer.relayed.peer}", flush=True)
    return verdict


def raise_descriptor_limit(logger: logging.Logger) -> None:
    """Raises this process's soft open-file limit to its hard limit (no-op where unsupported).

    The common soft limit of 1,024 descriptors is reached by about a thousand idle inbound
    connections; the hard limit is usually far higher, and a daemon that cannot open a file
    (its DHT pipes, its logs) stops announcing (issue #19).
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            logger.info("open-file limit raised from %d to %d", soft, target)
    except (ValueError, OSError) as error:
        logger.warning("could not raise the open-file limit: %s", error)

"""Command-line plumbing shared by the peer processes.

Configuration is data: each component has a frozen dataclass whose fields carry
their help text (``field(metadata={"help": ...})``). :func:`add_config_arguments`
turns such a class into flags, so no default is written twice, and
:func:`config_from_arguments` builds the dataclass back from the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, exclude: tuple[str, ...] = ()
) -> None:
    """Adds one flag per field of ``config_class`` (help from the field's metadata, default shown)."""
    for item in dataclasses.fields(config_class):
        if item.name in exclude:
            continue
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        help_text = f"{item.metadata.get('help', '')} (default: {default!r})"
        kind = type(default)
        if kind is bool:
            parser.add_argument(
                _flag(item.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif kind in (tuple, list):
            parser.add_argument(_flag(item.name), nargs="*", default=default, help=help_text)
        else:
            parser.add_argument(_flag(item.name), type=kind, default=default, help=help_text)


def config_from_arguments(config_class: type, args: argparse.Namespace, **overrides: Any):
    """Builds ``config_class`` from parsed flags; a ``ValueError`` from it names the flag."""
    values = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(config_class)
        if hasattr(args, item.name)
    }
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    values.update(overrides)
    return config_class(**values)


@dataclass(frozen=True)
class PeerOptions:
    """How a peer process joins a swarm; shared by `swarm join`, `swarm train` and `swarm health`."""

    initial_peers: tuple[str, ...] = field(
        default=(), metadata={"help": "multiaddrs of peers already in the swarm; none starts a new swarm"}
    )
    swarm: str = field(default="swarm", metadata={"help": "swarm name: the namespace of every DHT key"})
    swarm_key: str = field(
        default="", metadata={"help": "file with a private swarm's shared key (mode 0600)"}
    )
    identity: str = field(
        default="",
        metadata={"help": "this peer's key file (mode 0600; created on first use; default: a fresh one)"},
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for all interfaces)"}
    )
    dht_port: int = field(default=0, metadata={"help": "DHT (libp2p) TCP port; 0 picks a free one"})
    port: int = field(default=0, metadata={"help": "data-plane (ZeroMQ) TCP port; 0 picks a free one"})
    announce_host: str = field(
        default="", metadata={"help": "public address others should use, when it differs from --host (NAT)"}
    )
    reachability: str = field(
        default="auto",
        metadata={
            "help": "auto: ask up to 5 peers to dial us back at start-up; direct or relayed: say so "
            "without asking (relayed peers are reached through libp2p relays)"
        },
    )
    relay_service: bool = field(
        default=True, metadata={"help": "relay for peers behind NAT when we are reachable"}
    )
    relay_max_circuits: int = field(
        default=16, metadata={"help": "relayed connections at once per peer we relay for"}
    )
    relay_max_reservations: int = field(
        default=128, metadata={"help": "peers behind NAT that may hold a relay slot here"}
    )
    relay_data_limit: int = field(
        default=4 * 2**30, metadata={"help": "bytes per relayed connection and direction before it is reset"}
    )


def start_peer(options: PeerOptions, record_ttl: float = 240.0, client_mode: bool = False, identity=None):
    """Loads the identity and swarm key and starts the DHT node. Returns ``(identity, dht, swarm_key)``.

    ``identity``: use this one (a restart of the DHT keeps the peer's identity) instead of
    loading ``--identity`` or making a fresh one.

    Raises:
        SwarmError: a key file is unsafe or unreadable, or the DHT did not start (the
            message says why).
    """
    import tempfile

    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import load_or_create_identity, load_swarm_key
    from swarm.relay import RelayLimits

    if identity is None:
        identity_path = options.identity or str(Path(tempfile.mkdtemp(prefix="swarm-id-")) / "identity.pem")
        identity = load_or_create_identity(identity_path)
    swarm_key = load_swarm_key(options.swarm_key) if options.swarm_key else None
    host_maddrs = (f"/ip4/{options.host}/tcp/{options.dht_port}",)
    announce = (f"/ip4/{options.announce_host}/tcp/{options.dht_port}",) if options.announce_host else ()
    config = DHTConfig(
        swarm_name=options.swarm,
        initial_peers=tuple(options.initial_peers),
        host_maddrs=host_maddrs,
        announce_maddrs=announce if options.dht_port else (),
        record_ttl=record_ttl,
        client_mode=client_mode,
        # behind NAT the daemon takes a relay reservation (AutoNAT decides; --reachability
        # relayed tells it at once), so relayed peers can be reached through other peers
        use_auto_relay=True,
        force_reachability={"direct": "public", "relayed": "private"}.get(options.reachability),
        relay_limits=RelayLimits(
            enabled=options.relay_service,
            max_circuits=options.relay_max_circuits,
            max_reservations=options.relay_max_reservations,
            data_limit_bytes=options.relay_data_limit,
        ),
    )
    dht = SwarmDHT(identity, config, swarm_key)
    dht.start()
    return identity, dht, swarm_key


def reachability_config(options: PeerOptions):
    """The reachability check's settings from ``--reachability`` (``ValueError`` names the flag)."""
    from swarm.reachability import ReachabilityConfig

    return ReachabilityConfig(mode=options.reachability)  # type: ignore[arg-type]


def data_plane_address(options: PeerOptions, bound: str) -> str:
    """The address to announce for a bound ZeroMQ endpoint (``--announce-host`` replaces the host)."""
    if not options.announce_host:
        return bound
    port = bound.rsplit(":", 1)[1]
    return f"tcp://{options.announce_host}:{port}"


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_async(main: Callable[[], Any]) -> Any:
    """Runs ``main()`` on uvloop where available (plain asyncio elsewhere)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main())
    return uvloop.run(main())


def install_stop_handlers(stop, loop) -> None:
    """SIGINT/SIGTERM set ``stop`` (drain gracefully); a second signal exits at once."""

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        logger.info(
            "%s: finishing the current work, then leaving (again to force)", signal.Signals(signum).name
        )
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

"""What ``swarm health`` and ``swarm status`` read: the shared flags, and the reader's DHT node."""

from __future__ import annotations

import argparse
import dataclasses

from swarm.health import HealthThresholds


@dataclasses.dataclass(frozen=True)
class SwarmViewConfig:
    """How ``swarm health`` and ``swarm status`` read the swarm.

    Attributes:
        swarm: the swarm name (``--swarm``).
        initial_peers: multiaddrs of peers in the swarm (``--initial-peers``).
        runs: training runs to show besides those in the run index (``--run``, repeatable).
        request_timeout: deadline of one read of the DHT, in seconds (``--request-timeout``).
        start_timeout: deadline for the DHT node to start, in seconds (``--start-timeout``).
        min_redundancy: online servers per block below which coverage is degraded (``--min-redundancy``).
        stall_after: seconds without a new round before a run is stalled (``--stall-after``).
    """

    swarm: str = "swarm"
    initial_peers: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    request_timeout: float = 10.0
    start_timeout: float = 60.0
    min_redundancy: int = 2
    stall_after: float = 600.0

    def __post_init__(self) -> None:
        if not self.request_timeout > 0:
            raise ValueError(f"--request-timeout must be positive, got {self.request_timeout}")
        if not self.start_timeout > 0:
            raise ValueError(f"--start-timeout must be positive, got {self.start_timeout}")
        self.thresholds  # noqa: B018 - validates --min-redundancy and --stall-after

    @property
    def thresholds(self) -> HealthThresholds:
        return HealthThresholds(min_redundancy=self.min_redundancy, stall_after=self.stall_after)


def add_view_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``SwarmViewConfig`` flags (shared by ``swarm health`` and ``swarm status``)."""
    defaults = SwarmViewConfig()
    parser.add_argument("--swarm", default=defaults.swarm, help="swarm name (DHT key namespace)")
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=list(defaults.initial_peers),
        metavar="MULTIADDR",
        help="multiaddrs of peers already in the swarm",
    )
    parser.add_argument(
        "--run",
        action="append",
        default=list(defaults.runs),
        metavar="NAME",
        help="training run to show besides those in the run index (repeatable)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout,
        help="deadline of one DHT read, in seconds",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=defaults.start_timeout,
        help="deadline for the DHT node to start, in seconds",
    )
    parser.add_argument(
        "--min-redundancy",
        type=int,
        default=defaults.min_redundancy,
        help="online servers per block below which coverage is degraded",
    )
    parser.add_argument("--stall-after", type=float, default=defaults.stall_after,
                        help="seconds without a new round before a run counts as stalled")  # fmt: skip


def view_config_from_args(args: argparse.Namespace) -> SwarmViewConfig:
    """Raises ``ValueError`` naming the flag for invalid values."""
    return SwarmViewConfig(
        swarm=args.swarm,
        initial_peers=tuple(args.initial_peers),
        runs=tuple(args.run),
        request_timeout=args.request_timeout,
        start_timeout=args.start_timeout,
        min_redundancy=args.min_redundancy,
        stall_after=args.stall_after,
    )


def open_dht(view: SwarmViewConfig):
    """An ephemeral, client-mode ``SwarmDHT`` for reading the swarm (an async context manager).

    Raises:
        ConfigurationError: the swarm name is invalid.
    """
    from swarm.dht import DHTConfig, SwarmDHT  # hivemind is heavy; import when a command runs
    from swarm.health_reader import CachingRecordValidator
    from swarm.identity import Identity
    from swarm.records import namespaced_key

    namespaced_key(view.swarm)
    config = DHTConfig(
        swarm_name=view.swarm,
        initial_peers=view.initial_peers,
        start_timeout=view.start_timeout,
        request_timeout=view.request_timeout,
        client_mode=bool(view.initial_peers),
    )
    dht = SwarmDHT(Identity.generate(), config)
    # The reader re-reads thousands of unchanged signed records every few seconds:
    # verify each once (swarm.health_reader). Same checks, same limits as SwarmDHT's own.
    dht.validator = CachingRecordValidator(
        dht.identity, max_ttl=max(config.record_ttl, 1.0), max_clock_skew=config.max_clock_skew
    )
    return dht

"""``swarm health``: the swarm's health page, ``/api/state`` (JSON) and ``/metrics`` (Prometheus).

The server reads the swarm from its own DHT node every ``--refresh-interval`` seconds
(each read bounded by ``--request-timeout``) and, with ``--mqtt``, overlays the peers'
telemetry as it arrives. Routes::

    GET /            the page (server-rendered HTML, inline SVG, a small refresh script)
    GET /fragment    the live part of the page, re-fetched by the script
    GET /api/state   the snapshot as JSON (schema: ``swarm.health``)
    GET /metrics     the snapshot as Prometheus gauges

It binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from peers.health_feed import TelemetryFeed
from peers.health_metrics import SnapshotCollector
from peers.health_page import render_fragment, render_page
from peers.metrics import metrics_handler
from swarm.health import HealthThresholds, RunProgressTracker, SwarmView, build_health_state
from swarm.health_display import clip_text
from swarm.telemetry import parse_mqtt_url
from transport.errors import SwarmError

logger = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """The health server.

    Attributes:
        view: what to read (shared with ``swarm status``).
        host: address to bind (``--host``); loopback unless exposed on purpose.
        port: TCP port (``--port``); 0 picks a free one.
        mqtt: telemetry feed ``mqtt://host:port/prefix`` (``--mqtt``); None reads the DHT only.
        refresh_interval: seconds between DHT reads (``--refresh-interval``).
        poll_interval: seconds between the page's background refreshes (``--poll-interval``).
        mqtt_timeout: deadline of MQTT connect/subscribe, in seconds (``--mqtt-timeout``).
    """

    view: SwarmViewConfig = SwarmViewConfig()
    host: str = "127.0.0.1"
    port: int = 8080
    mqtt: str | None = None
    refresh_interval: float = 5.0
    poll_interval: float = 2.0
    mqtt_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not self.refresh_interval > 0:
            raise ValueError(f"--refresh-interval must be positive, got {self.refresh_interval}")
        if not self.poll_interval > 0:
            raise ValueError(f"--poll-interval must be positive, got {self.poll_interval}")
        if not self.mqtt_timeout > 0:
            raise ValueError(f"--mqtt-timeout must be positive, got {self.mqtt_timeout}")
        if self.mqtt is not None:
            parse_mqtt_url(self.mqtt)


class HealthService:
    """Holds the latest snapshot and serves it over HTTP.

    Args:
        config: the server settings.
        read_view: reads the swarm from the DHT (raises ``SwarmError`` on failure).
        feed: the MQTT telemetry feed, if any.
        clock: unix time source (injected in tests).
    """

    def __init__(
        self,
        config: HealthConfig,
        read_view: Callable[[], Awaitable[SwarmView]],
        *,
        feed: TelemetryFeed | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self._read_view = read_view
        self.feed = feed
        self._clock = clock
        self._tracker = RunProgressTracker()
        self._view = SwarmView(swarm=config.view.swarm)
        self._dht_error: str | None = "no DHT read yet"
        self.reads = 0
        self.state = self._build()
        self.registry = CollectorRegistry()
        self.registry.register(SnapshotCollector(lambda: self.state))

    def _build(self) -> dict[str, Any]:
        feed = self.feed
        sources = {
            "dht": True,
            "dht_error": self._dht_error,
            "mqtt": feed is not None,
            "mqtt_connected": bool(feed and feed.connected),
            "mqtt_peers": len(feed.peers) if feed else 0,
        }
        return build_health_state(
            self._view,
            now=self._clock(),
            tracker=self._tracker,
            thresholds=self.config.view.thresholds,
            telemetry=dict(feed.peers) if feed else None,
            sources=sources,
        )

    def rebuild(self) -> None:
        """Recomputes the snapshot from the last DHT view and the latest telemetry."""
        self.state = self._build()

    async def refresh_once(self) -> None:
        """Reads the DHT once and rebuilds the snapshot; a failed read keeps the last view and raises an alert."""
        try:
            self._view = await self._read_view()
            self._dht_error = None
        except SwarmError as error:
            self._dht_error = clip_text(f"{type(error).__name__}: {error}", 300)
            logger.warning("health: DHT read failed: %s", error)
        self.reads += 1
        self.rebuild()

    async def run_refresher(self) -> None:
        """Re-reads the DHT every ``refresh_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(
                self.config.refresh_interval
            )  # the period between reads, not a wait for state
            await self.refresh_once()

    def build_app(self) -> web.Application:
        """The aiohttp application with the page, ``/fragment``, ``/api/state`` and ``/metrics``."""
        headers = {
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self'",
        }

        async def page(_request: web.Request) -> web.Response:
            body = render_page(self.state, poll_interval=self.config.poll_interval)
            return web.Response(text=body, content_type="text/html", headers=headers)

        async def fragment(_request: web.Request) -> web.Response:
            return web.Response(text=render_fragment(self.state), content_type="text/html", headers=headers)

        async def api_state(_request: web.Request) -> web.Response:
            return web.Response(text=json.dumps(self.state), content_type="application/json", headers=headers)

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/fragment", fragment)
        app.router.add_get("/api/state", api_state)
        app.router.add_get("/metrics", metrics_handler(self.registry))
        return app

    async def serve(self, on_ready: Callable[[str], None] = lambda url: None) -> None:
        """Serves until cancelled: one DHT read, then the web server, the refresher and the feed.

        Args:
            on_ready: called with the page URL once it accepts connections.
        """
        await self.refresh_once()
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
            host, port = runner.addresses[0][:2]
            on_ready(f"http://{host}:{port}/")
            async with asyncio.TaskGroup() as group:
                group.create_task(self.run_refresher())
                if self.feed is not None:
                    group.create_task(self.feed.run())
        finally:
            await runner.cleanup()


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
    return SwarmDHT(Identity.generate(), config)


async def run_health(config: HealthConfig, on_ready: Callable[[str], None]) -> None:
    """Starts a DHT node and serves the health page until cancelled.

    Raises:
        DHTStartError: the DHT node did not start.
    """
    from swarm.health_reader import read_swarm_view

    feed = None
    async with open_dht(config.view) as dht:
        service: HealthService

        def on_update() -> None:
            service.rebuild()

        if config.mqtt is not None:
            feed = TelemetryFeed(
                parse_mqtt_url(config.mqtt),
                config.view.swarm,
                timeout=config.mqtt_timeout,
                max_reconnect_delay=max(config.refresh_interval, 1.0),
                on_update=on_update,
            )

        async def read_view() -> SwarmView:
            return await read_swarm_view(
                dht, config.view.swarm, runs=config.view.runs, timeout=config.view.request_timeout
            )

        service = HealthService(config, read_view, feed=feed)
        await service.serve(on_ready)


def _handle(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = HealthConfig(
            view=view_config_from_args(args),
            host=args.host,
            port=args.port,
            mqtt=args.mqtt,
            refresh_interval=args.refresh_interval,
            poll_interval=args.poll_interval,
            mqtt_timeout=args.mqtt_timeout,
        )
    except ValueError as error:
        print(f"swarm health: {error}", file=sys.stderr)
        return 2

    def on_ready(url: str) -> None:
        print(f"swarm health: serving {url}", flush=True)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await run_health(config, on_ready)
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except SwarmError as error:
        print(f"swarm health: {error}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    """Adds ``swarm health`` to the command line."""
    defaults = HealthConfig()
    parser = subparsers.add_parser("health", help="serve the swarm's health page, /api/state and /metrics")
    add_view_arguments(parser)
    parser.add_argument(
        "--host", default=defaults.host, help="address to bind (use 0.0.0.0 to expose the page)"
    )
    parser.add_argument("--port", type=int, default=defaults.port, help="TCP port (0 picks a free one)")
    parser.add_argument("--mqtt", default=defaults.mqtt, metavar="URL",
                        help="also follow peers' telemetry at mqtt://host:port/prefix")  # fmt: skip
    parser.add_argument("--refresh-interval", type=float, default=defaults.refresh_interval,
                        help="seconds between DHT reads")  # fmt: skip
    parser.add_argument("--poll-interval", type=float, default=defaults.poll_interval,
                        help="seconds between the page's background refreshes")  # fmt: skip
    parser.add_argument("--mqtt-timeout", type=float, default=defaults.mqtt_timeout,
                        help="deadline of MQTT connect/subscribe, in seconds")  # fmt: skip
    parser.set_defaults(handler=_handle)

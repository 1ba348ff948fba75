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
from peers.health_view import SwarmViewConfig, add_view_arguments, open_dht, view_config_from_args
from peers.metrics import metrics_handler
from swarm.health import RunProgressTracker, SwarmView, build_health_state
from swarm.health_display import clip_text
from swarm.health_history import HealthHistory, HistoryConfig
from swarm.telemetry import parse_mqtt_url
from transport.errors import SwarmError

logger = logging.getLogger(__name__)


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
        history_window: seconds of history the page keeps and charts (``--history-window``).
        min_rebuild_interval: fewest seconds between two snapshots rebuilt for MQTT updates
            (a 1,000-peer feed sends hundreds of messages a second).
    """

    view: SwarmViewConfig = dataclasses.field(default_factory=SwarmViewConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    mqtt: str | None = None
    refresh_interval: float = 5.0
    poll_interval: float = 2.0
    mqtt_timeout: float = 5.0
    history_window: float = 3600.0
    min_rebuild_interval: float = 0.5

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
        self.history  # noqa: B018 - validates --history-window
        if not self.min_rebuild_interval >= 0:
            raise ValueError(f"min_rebuild_interval must be >= 0, got {self.min_rebuild_interval}")

    @property
    def history(self) -> HistoryConfig:
        return HistoryConfig(window=self.history_window)


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
        self.history = HealthHistory(config.history)
        self._view = SwarmView(swarm=config.view.swarm)
        self._dht_error: str | None = "no DHT read yet"
        self.reads = 0
        self._rendered: dict[str, str] = {}
        self._last_rebuild = float("-inf")
        self._pending_rebuild: asyncio.TimerHandle | None = None
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
            "mqtt_rejected": dict(feed.rejected) if feed else {},
        }
        return build_health_state(
            self._view,
            now=self._clock(),
            tracker=self._tracker,
            thresholds=self.config.view.thresholds,
            telemetry=dict(feed.peers) if feed else None,
            sources=sources,
            history=self.history if self.reads else None,  # no samples before the first DHT read
        )

    def rebuild(self) -> None:
        """Recomputes the snapshot from the last DHT view and the latest telemetry."""
        if self._pending_rebuild is not None:
            self._pending_rebuild.cancel()
            self._pending_rebuild = None
        self.state = self._build()
        self._rendered = {}
        self._last_rebuild = time.monotonic()

    def rebuild_soon(self) -> None:
        """Rebuilds now, or once ``min_rebuild_interval`` after the last rebuild (MQTT bursts)."""
        if self._pending_rebuild is not None:
            return
        wait = self._last_rebuild + self.config.min_rebuild_interval - time.monotonic()
        if wait <= 0:
            self.rebuild()
        else:
            self._pending_rebuild = asyncio.get_running_loop().call_later(wait, self.rebuild)

    def rendered(self, kind: str) -> str:
        """The page or fragment of the current snapshot, rendered once per snapshot."""
        if kind not in self._rendered:
            if kind == "page":
                self._rendered[kind] = render_page(self.state, poll_interval=self.config.poll_interval)
            else:
                self._rendered[kind] = render_fragment(self.state)
        return self._rendered[kind]

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
            return web.Response(text=self.rendered("page"), content_type="text/html", headers=headers)

        async def fragment(_request: web.Request) -> web.Response:
            return web.Response(text=self.rendered("fragment"), content_type="text/html", headers=headers)

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
            if self._pending_rebuild is not None:
                self._pending_rebuild.cancel()
            await runner.cleanup()


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
            service.rebuild_soon()

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
            history_window=args.history_window,
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
    parser.add_argument("--history-window", type=float, default=defaults.history_window,
                        help="seconds of history the page keeps and charts")  # fmt: skip
    parser.set_defaults(handler=_handle)

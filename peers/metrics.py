"""A small ``/metrics`` endpoint (Prometheus text format) that any peer daemon can run.

The daemon owns its gauges in its own ``CollectorRegistry`` and serves them::

    registry = CollectorRegistry()
    load = Gauge("swarm_server_load", "requests queued or running", registry=registry)
    async with MetricsServer(MetricsConfig(port=args.metrics_port), registry) as server:
        print(server.url)
        ...                    # set gauges while serving; the server stops on exit

or, inside a task group, ``group.create_task(MetricsServer(config, registry).run())``.
The health server mounts ``metrics_handler(registry)`` on its own application.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from types import TracebackType

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Where a daemon serves ``/metrics``.

    Attributes:
        host: address to bind (``--metrics-host``); loopback unless exposed on purpose.
        port: TCP port (``--metrics-port``); 0 picks a free one.
    """

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.port}")
        if not self.host:
            raise ValueError("--metrics-host must not be empty")


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--metrics-port`` and ``--metrics-host`` to a daemon's parser (off unless a port is given)."""
    defaults = MetricsConfig()
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    parser.add_argument("--metrics-host", default=defaults.host, help="address /metrics binds to")


def metrics_config_from_args(args: argparse.Namespace) -> MetricsConfig | None:
    """The config from ``add_metrics_arguments`` flags (None without ``--metrics-port``).

    Raises:
        ValueError: a flag is invalid (the message names it).
    """
    if args.metrics_port is None:
        return None
    return MetricsConfig(host=args.metrics_host, port=args.metrics_port)


def metrics_handler(registry: CollectorRegistry):
    """An aiohttp handler that renders ``registry`` in the Prometheus text format."""

    async def handle(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


class MetricsServer:
    """Serves ``/metrics`` for one registry. An async context manager, or ``await run()``.

    Args:
        config: where to bind.
        registry: the daemon's gauges.
    """

    def __init__(self, config: MetricsConfig, registry: CollectorRegistry):
        self.config = config
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` once started."""
        return f"http://{self.config.host}:{self.port}/metrics"

    async def __aenter__(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(self.registry))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def run(self) -> None:
        """Serves until cancelled."""
        async with self:
            await asyncio.Event().wait()

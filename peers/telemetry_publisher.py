"""MQTT telemetry of one daemon: ``--mqtt`` flags and a publisher that survives broker outages.

The message format (topics, schema, encoding) lives in ``swarm.telemetry``; this module
sends it. A daemon uses it like this (``--mqtt`` maps onto ``TelemetryConfig.url``)::

    publisher = TelemetryPublisher(config, swarm=name, identity=me, snapshot=lambda: server_telemetry_state(record))
    async with asyncio.TaskGroup() as group:
        group.create_task(publisher.run())
        ...
        publisher.notify()   # state changed: publish now (never blocks)
        ...
        publisher.stop()     # publishes "offline" and returns from run()

(``daemon_publisher`` and ``exporting`` wrap exactly this for ``swarm join`` and
``swarm train``.) A broker that is down or goes away never blocks the peer: every
connect and publish has a deadline, ``notify()`` only sets an event, and ``run()``
reconnects with a capped backoff, publishing the current state as soon as the broker is
back. The broker keeps a last will that marks the peer offline if it vanishes. Every
message, the will included, is signed with the peer's identity key and carries its
time and connection (``swarm.telemetry``), so readers drop forgeries and replays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt

from peers.metrics import MetricsConfig, MetricsServer
from swarm.identity import Identity
from swarm.telemetry import MqttEndpoint, encode_message, parse_mqtt_url

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """MQTT telemetry of one peer.

    Attributes:
        url: broker and topic prefix, ``mqtt://host:port/prefix`` (``--mqtt``).
        period: seconds between publications when nothing changes (``--telemetry-period``).
        timeout: deadline of one connect or publish, in seconds (``--mqtt-timeout``).
        max_reconnect_delay: longest wait between reconnection attempts, in seconds
            (``--mqtt-reconnect-delay``).
    """

    url: str
    period: float = 10.0
    timeout: float = 5.0
    max_reconnect_delay: float = 10.0

    def __post_init__(self) -> None:
        parse_mqtt_url(self.url)
        if not self.period > 0:
            raise ValueError(f"--telemetry-period must be positive, got {self.period}")
        if not self.timeout > 0:
            raise ValueError(f"--mqtt-timeout must be positive, got {self.timeout}")
        if not self.max_reconnect_delay > 0:
            raise ValueError(f"--mqtt-reconnect-delay must be positive, got {self.max_reconnect_delay}")

    @property
    def endpoint(self) -> MqttEndpoint:
        return parse_mqtt_url(self.url)


def add_telemetry_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--mqtt`` and its tuning flags to a daemon's parser (defaults from ``TelemetryConfig``)."""
    defaults = TelemetryConfig(url="mqtt://localhost")
    parser.add_argument(
        "--mqtt", metavar="URL", default=None, help="publish telemetry to mqtt://host:port/prefix"
    )
    parser.add_argument(
        "--telemetry-period", type=float, default=defaults.period, help="seconds between publications"
    )
    parser.add_argument(
        "--mqtt-timeout", type=float, default=defaults.timeout, help="deadline of one MQTT operation"
    )
    parser.add_argument(
        "--mqtt-reconnect-delay",
        type=float,
        default=defaults.max_reconnect_delay,
        help="longest reconnect backoff",
    )


def telemetry_config_from_args(args: argparse.Namespace) -> TelemetryConfig | None:
    """The telemetry config from flags added by ``add_telemetry_arguments`` (None without ``--mqtt``).

    Raises:
        ValueError: a flag is invalid (the message names it).
    """
    if not args.mqtt:
        return None
    return TelemetryConfig(
        url=args.mqtt,
        period=args.telemetry_period,
        timeout=args.mqtt_timeout,
        max_reconnect_delay=args.mqtt_reconnect_delay,
    )


def daemon_publisher(
    config: TelemetryConfig | None, swarm: str, dht, snapshot: Callable[[], Mapping[str, Any]]
) -> TelemetryPublisher | None:
    """A daemon's publisher for ``dht``'s peer in ``swarm``; None without ``--mqtt``."""
    if config is None:
        return None
    return TelemetryPublisher(config, swarm=swarm, identity=dht.identity, snapshot=snapshot)


@contextlib.asynccontextmanager
async def exporting(metrics: MetricsConfig | None, registry, publisher: TelemetryPublisher | None):
    """Runs a daemon's ``/metrics`` server (``--metrics-port``) and telemetry publisher
    (``--mqtt``) around its main work; either may be off.

    Prints ``metrics at URL`` once ``/metrics`` serves; on the way out the publisher
    announces the peer offline.
    """
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
        if metrics is not None:
            server = await stack.enter_async_context(MetricsServer(metrics, registry))
            print(f"metrics at {server.url}", flush=True)
        if publisher is not None:
            tasks.create_task(publisher.run())
        try:
            yield
        finally:
            if publisher is not None:
                publisher.stop()


class TelemetryPublisher:
    """Publishes one peer's state to MQTT periodically and on change; survives broker outages.

    Args:
        config: broker, period and deadlines.
        swarm: the swarm name (second topic level).
        identity: this peer's identity: its id is the third topic level, its key signs.
        snapshot: returns the peer's current state (``server_telemetry_state(...)`` or
            ``trainer_telemetry_state(...)``); called from ``run()`` before each publication.
        clock: unix time source for ``sent_at`` (injected in tests).
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        swarm: str,
        identity: Identity,
        snapshot: Callable[[], Mapping[str, Any]],
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.swarm = swarm
        self.identity = identity
        self.peer_id = str(identity.peer_id)
        self._snapshot = snapshot
        self._clock = clock
        self._endpoint = config.endpoint
        self.topic = self._endpoint.topic(swarm, self.peer_id)
        self._session = ""  # names the current broker connection (and its will)
        self._changed = asyncio.Event()
        self._stopped = asyncio.Event()
        self.connected = False
        self.published = 0
        self.failures = 0

    def notify(self) -> None:
        """Asks for a publication now (the state changed). Never blocks."""
        self._changed.set()

    def stop(self) -> None:
        """Makes ``run()`` publish "offline" (if connected) and return."""
        self._stopped.set()
        self._changed.set()

    def _client(self) -> aiomqtt.Client:
        self._session = uuid.uuid4().hex[:16]
        message = encode_message(
            self.swarm,
            self.identity,
            online=False,
            state=None,
            sent_at=self._clock(),
            session=self._session,
            will=True,
        )
        will = aiomqtt.Will(self.topic, message, qos=1, retain=True)
        return aiomqtt.Client(
            self._endpoint.host,
            self._endpoint.port,
            identifier=f"swarm-{self.peer_id[:16]}-{uuid.uuid4().hex[:8]}",
            will=will,
            timeout=self.config.timeout,
            keepalive=max(5, math.ceil(self.config.period * 3)),
        )

    async def _publish(self, client: aiomqtt.Client, *, online: bool) -> None:
        state = self._snapshot() if online else None
        payload = encode_message(
            self.swarm,
            self.identity,
            online=online,
            state=state,
            sent_at=self._clock(),
            session=self._session,
        )
        async with asyncio.timeout(self.config.timeout):
            await client.publish(self.topic, payload, qos=1, retain=True, timeout=self.config.timeout)
        self.published += 1

    async def _serve(self, client: aiomqtt.Client) -> None:
        while not self._stopped.is_set():
            self._changed.clear()
            await self._publish(client, online=True)
            try:
                async with asyncio.timeout(self.config.period):
                    await self._changed.wait()
            except TimeoutError:
                pass
        await self._publish(client, online=False)

    async def run(self) -> None:
        """Connects, publishes until ``stop()``, and reconnects after failures (capped backoff).

        Never raises for broker trouble: failures are logged, counted in ``failures`` and retried.
        """
        initial_delay = min(0.1, self.config.max_reconnect_delay)
        delay = initial_delay
        while not self._stopped.is_set():
            try:
                # Connect is bounded by the client's own timeout; this scope also bounds a
                # disconnect that hangs on a half-dead socket.
                async with self._client() as client:
                    self.connected = True
                    delay = initial_delay
                    await self._serve(client)
            except (aiomqtt.MqttError, TimeoutError, OSError) as error:
                self.failures += 1
                logger.warning(
                    "MQTT telemetry to %s failed (retrying in %.1fs): %s", self._endpoint.host, delay, error
                )
                try:
                    async with asyncio.timeout(delay):
                        await self._stopped.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.config.max_reconnect_delay)
            finally:
                self.connected = False

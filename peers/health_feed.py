"""The health page's MQTT feed: the latest telemetry of every peer of one swarm.

Subscribes to ``prefix/<swarm>/+`` and keeps one ``PeerTelemetry`` per peer, decoded by
``swarm.telemetry`` (the message format, its signature and what a reader rejects are
documented there) and judged by ``swarm.telemetry_freshness`` (replays). Rejected messages
are logged, counted by cause in ``rejected`` (``forged``, ``replayed``, ``stale``,
``malformed``; the health page shows the counts) and skipped. Reconnects after broker
failures like the publisher; never raises for broker trouble.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import aiomqtt

from swarm.swarm_errors import MalformedRecord
from swarm.telemetry import ForgedTelemetry, MqttEndpoint, PeerTelemetry, decode_message
from swarm.telemetry_freshness import TelemetryFreshness

logger = logging.getLogger(__name__)

MAX_PEERS = 10_000
"""Peers remembered at most; a flood of fake peer topics cannot grow memory without bound."""


class TelemetryFeed:
    """Keeps the latest telemetry per peer of ``swarm``.

    Args:
        endpoint: the broker and topic prefix.
        swarm: whose peers to follow.
        timeout: deadline of connect and subscribe, in seconds.
        max_reconnect_delay: longest wait between reconnection attempts, in seconds.
        on_update: called (synchronously) after each accepted message.
        freshness: judges replays (default: ``TelemetryFreshness()``).
        clock: unix time source (injected in tests).
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        swarm: str,
        *,
        timeout: float,
        max_reconnect_delay: float,
        on_update: Callable[[], None] = lambda: None,
        freshness: TelemetryFreshness | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.endpoint = endpoint
        self.swarm = swarm
        self.timeout = timeout
        self.max_reconnect_delay = max_reconnect_delay
        self._on_update = on_update
        self.peers: dict[str, PeerTelemetry] = {}
        self.connected = False
        self.messages = 0
        self.rejected = {"forged": 0, "replayed": 0, "stale": 0, "malformed": 0}
        self._freshness = freshness or TelemetryFreshness(max_peers=2 * MAX_PEERS)
        self._clock = clock

    def accept(self, topic: str, payload: bytes) -> bool:
        """Applies one message. Returns whether it was valid (invalid ones are logged and skipped)."""
        peer = topic.rsplit("/", 1)[-1]
        if not payload:  # a cleared retained message
            self.peers.pop(peer, None)
            return True
        try:
            telemetry = decode_message(payload, swarm=self.swarm, peer=peer)
        except (ValueError, MalformedRecord) as error:
            return self._reject("forged" if isinstance(error, ForgedTelemetry) else "malformed", topic, error)
        if peer not in self.peers and len(self.peers) >= MAX_PEERS:
            return False
        verdict = self._freshness.judge(peer, telemetry, self._clock())
        if verdict is not None:
            return self._reject(
                verdict, topic, f"sent at {telemetry.sent_at:.3f}, session {telemetry.session!r}"
            )
        self.peers[peer] = telemetry
        self.messages += 1
        self._on_update()
        return True

    def _reject(self, cause: str, topic: str, why: object) -> bool:
        self.rejected[cause] += 1
        count = self.rejected[cause]
        if count & (count - 1) == 0:  # 1, 2, 4, ...: a flood of forgeries logs little
            logger.warning(
                "dropped %s telemetry on %s (%d so far): %s", cause, topic[:200], count, str(why)[:200]
            )
        return False

    async def run(self) -> None:
        """Subscribes and follows the feed until cancelled, reconnecting after failures."""
        initial_delay = min(0.1, self.max_reconnect_delay)
        delay = initial_delay
        while True:
            try:
                client = aiomqtt.Client(
                    self.endpoint.host,
                    self.endpoint.port,
                    identifier=f"swarm-health-{uuid.uuid4().hex[:12]}",
                    timeout=self.timeout,
                )
                async with client:
                    await client.subscribe(
                        self.endpoint.swarm_filter(self.swarm), qos=1, timeout=self.timeout
                    )
                    self.connected = True
                    delay = initial_delay
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.accept(str(message.topic), payload)
            except aiomqtt.MqttError as error:
                logger.warning(
                    "MQTT feed from %s failed (retrying in %.1fs): %s", self.endpoint.host, delay, error
                )
            finally:
                self.connected = False
            await asyncio.sleep(delay)  # backoff between reconnection attempts, not a wait for state
            delay = min(delay * 2, self.max_reconnect_delay)

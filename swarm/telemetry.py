"""The MQTT telemetry format, both directions: topics, the message schema, encode and decode.

A peer publishes its state to ``prefix/<swarm>/<peer>`` as retained JSON (UTF-8, QoS 1)::

    {"schema": 1, "swarm": str, "peer": str, "online": bool, "sent_at": float | null,
     "state": {"kind": "server", "peer": str, **ServerRecord wire}        # a serving peer
            | {"kind": "trainer", "run": str, **TrainingPeerRecord wire}   # a training peer
            | null}

Bytes fields (the CURVE key) travel as ASCII strings; non-finite floats as ``null``. The
broker holds a last will with ``"online": false`` for the same topic, so a peer that
vanishes is marked offline; a clean exit publishes the same message itself. An empty
retained message clears the topic. Readers reject messages over
:data:`MAX_PAYLOAD_BYTES`, for another swarm, or whose peer differs from the topic.

Pure data, no network: ``peers.telemetry_publisher`` sends what :func:`encode_message`
makes, ``peers.health_feed`` follows the broker and applies :func:`decode_message`, and
the health snapshot (``swarm.health``) overlays the resulting :class:`PeerTelemetry` on
the DHT's records.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any

from swarm.records import ServerRecord, is_valid_name
from swarm.swarm_errors import MalformedRecord
from swarm.training.progress import TrainingPeerRecord

TELEMETRY_SCHEMA = 1
DEFAULT_MQTT_PORT = 1883
DEFAULT_PREFIX = "swarm"
MAX_PAYLOAD_BYTES = 256 * 1024
"""Largest telemetry message a reader accepts (a loss history of 64 rounds is ~2 KiB)."""


@dataclasses.dataclass(frozen=True)
class MqttEndpoint:
    """A parsed ``mqtt://host:port/prefix`` URL."""

    host: str
    port: int
    prefix: str

    def topic(self, swarm: str, peer: str) -> str:
        """The topic of one peer: ``prefix/<swarm>/<peer>``."""
        return f"{self.prefix}/{swarm}/{peer}"

    def swarm_filter(self, swarm: str) -> str:
        """The subscription filter for every peer of a swarm: ``prefix/<swarm>/+``."""
        return f"{self.prefix}/{swarm}/+"


def parse_mqtt_url(url: str, flag: str = "--mqtt") -> MqttEndpoint:
    """Parses ``mqtt://host[:port][/prefix]`` (port 1883 and prefix ``swarm`` by default).

    Raises:
        ValueError: not an ``mqtt://`` URL, no host, a bad port, or wildcards in the prefix.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise ValueError(f"{flag} {url!r}: expected mqtt://host:port/prefix")
    try:
        port = parsed.port or DEFAULT_MQTT_PORT
    except ValueError as error:
        raise ValueError(f"{flag} {url!r}: bad port") from error
    prefix = parsed.path.strip("/") or DEFAULT_PREFIX
    if "#" in url or parsed.query or any(char in prefix for char in "+\0") or "//" in prefix:
        raise ValueError(f"{flag} {url!r}: the topic prefix must not contain '+', '#' or empty levels")
    return MqttEndpoint(parsed.hostname, port, prefix)


def server_telemetry_state(record: ServerRecord) -> dict[str, Any]:
    """The telemetry ``state`` of a serving peer: its record's wire fields."""
    return {"kind": "server", "peer": str(record.peer_id), **record.to_wire()}


def trainer_telemetry_state(run: str, record: TrainingPeerRecord) -> dict[str, Any]:
    """The telemetry ``state`` of a training peer: its record's wire fields (incl. loss history)."""
    return {"kind": "trainer", "run": run, **record.to_wire()}


def to_json_value(value: Any) -> Any:
    """Converts record wire values to JSON: bytes to ASCII text, enums to values, NaN/inf to None."""
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    return value


def encode_message(swarm: str, peer: str, *, online: bool, state: Any, sent_at: float | None) -> bytes:
    """Encodes one telemetry message (schema in the module docstring)."""
    message = {
        "schema": TELEMETRY_SCHEMA,
        "swarm": swarm,
        "peer": peer,
        "online": online,
        "sent_at": sent_at,
        "state": to_json_value(state),
    }
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


@dataclasses.dataclass(frozen=True)
class PeerTelemetry:
    """The latest telemetry of one peer, decoded.

    Attributes:
        online: False once the peer's last will (or clean exit) said it went offline.
        server: its server record as published, if it serves.
        trainer: ``(run, record)`` if it trains.
    """

    online: bool
    server: ServerRecord | None = None
    trainer: tuple[str, TrainingPeerRecord] | None = None


def parse_telemetry_state(state: Any) -> tuple[ServerRecord | None, tuple[str, TrainingPeerRecord] | None]:
    """Parses the ``state`` of a telemetry message.

    Args:
        state: ``{"kind": "server", "peer": id, **server record wire}`` or
            ``{"kind": "trainer", "run": name, **training record wire}``; bytes fields
            (``curve``) arrive as strings.

    Returns:
        ``(server, None)`` or ``(None, (run, trainer))``.

    Raises:
        MalformedRecord: anything else.
    """
    if not isinstance(state, Mapping):
        raise MalformedRecord("telemetry state must be an object")
    wire = dict(state)
    if isinstance(wire.get("curve"), str):
        wire["curve"] = wire["curve"].encode("ascii", "replace")
    kind = wire.get("kind")
    if kind == "server":
        peer = wire.get("peer")
        if not isinstance(peer, str):
            raise MalformedRecord("server telemetry lacks its peer id")
        return ServerRecord.from_wire(peer, wire), None
    if kind == "trainer":
        run = wire.get("run")
        if not is_valid_name(run):
            raise MalformedRecord("trainer telemetry lacks a valid run name")
        return None, (run, TrainingPeerRecord.from_wire(wire))
    raise MalformedRecord(f"unknown telemetry kind {repr(kind)[:80]}")


def decode_message(payload: bytes, *, swarm: str, peer: str) -> PeerTelemetry:
    """Decodes one non-empty telemetry message received on ``peer``'s topic of ``swarm``.

    Raises:
        MalformedRecord: too large, not JSON, for another swarm or peer, or a malformed state.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedRecord(f"{len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as error:  # bad UTF-8; nesting deeper than the stack
        raise MalformedRecord(f"not JSON: {str(error)[:200]}") from error
    if not isinstance(message, dict) or message.get("peer") != peer or message.get("swarm") != swarm:
        raise MalformedRecord("peer or swarm does not match the topic")
    online = message.get("online")
    if not isinstance(online, bool):
        raise MalformedRecord("'online' must be a bool")
    server, trainer = parse_telemetry_state(message.get("state")) if online else (None, None)
    return PeerTelemetry(online=online, server=server, trainer=trainer)

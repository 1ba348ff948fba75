"""The MQTT telemetry format, both directions: topics, the message schema, encode and decode.

A peer publishes its state to ``prefix/<swarm>/<peer>`` as retained JSON (UTF-8, QoS 1),
signed with its identity key (issue #14: before, anyone who could reach the broker could
publish in any peer's name)::

    {"schema": 2, "key": base64 Ed25519 public key, "sig": base64 signature,
     "signed": JSON text of the body:
        {"swarm": str, "peer": str, "online": bool, "sent_at": float, "session": str,
         "will": bool,
         "state": {"kind": "server", "peer": str, **ServerRecord wire}        # a serving peer
                | {"kind": "trainer", "run": str, **TrainingPeerRecord wire}   # a training peer
                | null}}

The signature is Ed25519 over ``b"swarm/telemetry/v1" + signed`` (the exact bytes, so no
canonical JSON is needed), and the key's peer id must be the topic's peer: the same id
the peer's DHT records are signed under, so a message verifies exactly when the DHT
record's owner made it. ``sent_at`` (the sender's unix time) and ``session`` (one per
broker connection) let the reader drop replays (``swarm.telemetry_freshness``).

Bytes fields (the CURVE key) travel as ASCII strings; non-finite floats as ``null``. The
broker holds a last will with ``"online": false, "will": true`` for the same topic, signed
when the connection opened, so a peer that vanishes is marked offline; a clean exit
publishes an offline message itself. An empty retained message clears the topic. Readers
reject messages over :data:`MAX_PAYLOAD_BYTES`, for another swarm, whose peer differs
from the topic, or whose signature does not verify (:class:`ForgedTelemetry`).

Pure data, no network: ``peers.telemetry_publisher`` sends what :func:`encode_message`
makes, ``peers.health_feed`` follows the broker and applies :func:`decode_message`, and
the health snapshot (``swarm.health``) overlays the resulting :class:`PeerTelemetry` on
the DHT's records.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any

from swarm.identity import Identity, peer_id_from_public_key, verify_signature
from swarm.records import ServerRecord, is_valid_name
from swarm.swarm_errors import MalformedRecord
from swarm.training.progress import TrainingPeerRecord

TELEMETRY_SCHEMA = 2
_SIGNED_LABEL = b"swarm/telemetry/v1"
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
    """The telemetry ``state`` of a serving peer: its record's wire fields.

    Without the raw identity key (``ik``): it is binary, and the message's own ``key``
    already carries it.
    """
    wire = record.to_wire()
    wire.pop("ik", None)
    return {"kind": "server", "peer": str(record.peer_id), **wire}


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


class ForgedTelemetry(MalformedRecord):
    """A telemetry message that is not signed by the peer its topic names (fatal: dropped)."""


def encode_message(
    swarm: str,
    identity: Identity,
    *,
    online: bool,
    state: Any,
    sent_at: float,
    session: str,
    will: bool = False,
) -> bytes:
    """Encodes and signs one telemetry message of ``identity``'s peer (schema in the module docstring).

    Args:
        swarm: the swarm name (must match the topic's).
        identity: the publishing peer; its key signs, its id is the message's peer.
        online: False for the offline message and the last will.
        state: the peer's state (``server_telemetry_state`` ...), None when offline.
        sent_at: the sender's unix time now (the will: when its connection opened).
        session: names the broker connection this message (and its will) belongs to.
        will: this is the last will the broker publishes if the connection dies.
    """
    body = {
        "swarm": swarm,
        "peer": str(identity.peer_id),
        "online": online,
        "sent_at": float(sent_at),
        "session": session,
        "will": will,
        "state": to_json_value(state),
    }
    signed = json.dumps(body, separators=(",", ":"), allow_nan=False)
    signature = identity.sign(_SIGNED_LABEL + signed.encode())
    message = {
        "schema": TELEMETRY_SCHEMA,
        "key": base64.b64encode(identity.public_key).decode(),
        "sig": base64.b64encode(signature).decode(),
        "signed": signed,
    }
    return json.dumps(message, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class PeerTelemetry:
    """The latest telemetry of one peer, decoded.

    Attributes:
        online: False once the peer's last will (or clean exit) said it went offline.
        server: its server record as published, if it serves.
        trainer: ``(run, record)`` if it trains.
        sent_at: the sender's unix time when it signed the message.
        session: the broker connection the message belongs to.
        will: the message is the broker-delivered last will of that connection.
    """

    online: bool
    server: ServerRecord | None = None
    trainer: tuple[str, TrainingPeerRecord] | None = None
    sent_at: float = 0.0
    session: str = ""
    will: bool = False


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


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # bad UTF-8; nesting deeper than the stack
        raise MalformedRecord(f"not JSON: {str(error)[:200]}") from error


def _verified_body(message: Any, peer: str) -> Any:
    """The signed body of ``message`` once its signature by ``peer``'s key is checked."""
    if not isinstance(message, dict) or message.get("schema") != TELEMETRY_SCHEMA:
        raise ForgedTelemetry(f"not a signed (schema {TELEMETRY_SCHEMA}) telemetry message")
    key, signature, signed = message.get("key"), message.get("sig"), message.get("signed")
    if not (isinstance(key, str) and isinstance(signature, str) and isinstance(signed, str)):
        raise ForgedTelemetry("unsigned telemetry message")
    try:
        key_bytes, signature_bytes = (
            base64.b64decode(key, validate=True),
            base64.b64decode(signature, validate=True),
        )
        signer = peer_id_from_public_key(key_bytes)
    except (ValueError, binascii.Error) as error:
        raise ForgedTelemetry(f"malformed key or signature: {error}") from error
    if signer != peer:
        raise ForgedTelemetry(f"signed by {signer}, not by the topic's peer")
    if not verify_signature(key_bytes, _SIGNED_LABEL + signed.encode(), signature_bytes):
        raise ForgedTelemetry("bad signature")
    return _loads(signed)


def decode_message(payload: bytes, *, swarm: str, peer: str) -> PeerTelemetry:
    """Decodes one non-empty telemetry message received on ``peer``'s topic of ``swarm``.

    Raises:
        ForgedTelemetry: unsigned, signed by another key than ``peer``'s, a bad signature,
            or a genuine message of this peer for another swarm or peer (moved there).
        MalformedRecord: too large, not JSON, or a malformed body or state.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedRecord(f"{len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    body = _verified_body(_loads(payload), peer)
    if not isinstance(body, dict) or body.get("peer") != peer or body.get("swarm") != swarm:
        raise ForgedTelemetry("signed for another peer or swarm than the topic's")
    online, sent_at = body.get("online"), body.get("sent_at")
    session, will = body.get("session"), body.get("will")
    if not isinstance(online, bool) or not isinstance(will, bool) or not isinstance(session, str):
        raise MalformedRecord("'online' and 'will' must be bools, 'session' a string")
    if isinstance(sent_at, bool) or not isinstance(sent_at, (int, float)) or not math.isfinite(sent_at):
        raise MalformedRecord("'sent_at' must be a finite number")
    server, trainer = parse_telemetry_state(body.get("state")) if online else (None, None)
    return PeerTelemetry(
        online=online, server=server, trainer=trainer, sent_at=float(sent_at), session=session[:64], will=will
    )

"""What peers publish in the DHT: typed records, their wire form, and the key layout.

Keys are namespaced by swarm name; every record is a per-peer record (subkey = peer id)::

    {swarm}.model          one ModelRecord per server (readers take the majority)
    {swarm}.block.{i}      one ServerRecord per server holding block i

Training runs have their own keys and records in ``swarm.training.progress``; their
parsers use this module's :func:`read_field` too.

Wire values are msgpack-friendly dicts with short keys. Readers ignore unknown fields
(newer peers may add some) and raise ``MalformedRecord`` on missing or mistyped ones;
listing functions log and skip such records. ``None`` is a withdrawn record (tombstone).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from swarm.identity import PeerId, curve_public_key_of, peer_id_from_public_key
from swarm.reachability import Reachability
from swarm.spans import Span
from swarm.swarm_errors import InvalidSpan, MalformedRecord
from transport.errors import ConfigurationError

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def is_valid_name(name: object) -> bool:
    """Whether ``name`` may name a swarm or a training run: 1-64 letters, digits, ``_`` or ``-``."""
    return isinstance(name, str) and _NAME_RE.match(name) is not None


def check_name(name: str, flag: str) -> str:
    """Returns ``name`` if :func:`is_valid_name` accepts it.

    Raises:
        ConfigurationError: it does not; the message names ``flag``.
    """
    if not is_valid_name(name):
        raise ConfigurationError(f"{flag} {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


def namespaced_key(swarm: str, *parts: str | int) -> str:
    """Builds a DHT key in the swarm's namespace, e.g. ``namespaced_key("s", "block", 3)``.

    Raises:
        ConfigurationError: the swarm name has characters other than letters, digits, ``_-``.
    """
    check_name(swarm, "--swarm")
    return ".".join([swarm, *(str(part) for part in parts)])


def model_key(swarm: str) -> str:
    """The key of the model records: ``{swarm}.model``."""
    return namespaced_key(swarm, "model")


def block_key(swarm: str, block: int) -> str:
    """The key listing the servers of one block: ``{swarm}.block.{block}``."""
    return namespaced_key(swarm, "block", block)


class PeerValue(NamedTuple):
    """One per-peer value found in the DHT, with its expiration (DHT time)."""

    value: Any
    expiration_time: float


class ServerState(enum.StrEnum):
    """Lifecycle of a server: JOINING (loading weights), ONLINE (serving), DRAINING (leaving)."""

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


def read_field(
    wire: Mapping[str, Any],
    name: str,
    types: type | tuple[type, ...],
    default: Any = ...,
    *,
    record: str = "record",
) -> Any:
    """One type-checked field of a record's wire dict (every DHT record parser uses this).

    Args:
        wire: the record's wire dict.
        name: the field's key.
        types: the accepted types. ``bool`` is accepted only if listed: ``True`` is an
            ``int`` to ``isinstance``, but never a valid count or round.
        default: returned when the field is missing; without one, a missing field is malformed.
        record: what the record is called in error messages, e.g. ``"training record"``.

    Raises:
        MalformedRecord: the field is missing (and has no default) or has another type.
    """
    if name not in wire:
        if default is ...:
            raise MalformedRecord(f"{record} lacks field {name!r}")
        return default
    value = wire[name]
    allowed = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise MalformedRecord(f"{record} field {name!r} has type {type(value).__name__}")
    return value


def read_wire_dict(wire: Any, record: str) -> Mapping[str, Any]:
    """``wire`` itself when it is a dict (a record's wire form), else ``MalformedRecord``."""
    if not isinstance(wire, Mapping):
        raise MalformedRecord(f"{record} must be a dict, got {type(wire).__name__}")
    return wire


def read_state(wire: Mapping[str, Any], states: type[enum.StrEnum], *, record: str = "record") -> Any:
    """The ``state`` field of a record's wire dict, as a member of ``states``."""
    value = read_field(wire, "state", str, record=record)
    try:
        return states(value)
    except ValueError as error:
        raise MalformedRecord(f"{record}: unknown state {value!r}") from error


def _non_negative(name: str, value: float) -> float:
    if not value >= 0:  # also rejects NaN
        raise MalformedRecord(f"field {name!r} must be >= 0, got {value!r}")
    return value


MAX_CONFIG_FIELDS = 64  # a model config has ~25; more is not a config


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """The model this swarm serves.

    Attributes:
        model_id: a human name such as ``"meta-llama/Llama-2-70b-hf"``.
        config_hash: hex hash of the model's config (peers with another hash are another model).
        n_blocks: number of transformer blocks.
        config_fields: the hashed config values as sorted (name, value) pairs, so that a
            client with another config can be told what differs (empty from older peers).
    """

    model_id: str
    config_hash: str
    n_blocks: int
    config_fields: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.n_blocks <= 0:
            raise MalformedRecord(f"n_blocks must be positive, got {self.n_blocks}")

    def to_wire(self) -> dict[str, Any]:
        """Returns the msgpack-friendly dict stored in the DHT."""
        wire = {"model": self.model_id, "config": self.config_hash, "blocks": self.n_blocks}
        if self.config_fields:
            wire["fields"] = dict(self.config_fields)
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> ModelRecord:
        """Parses a wire dict; unknown fields are ignored.

        Raises:
            MalformedRecord: not a dict, or a field is missing or mistyped.
        """
        if not isinstance(wire, Mapping):
            raise MalformedRecord(f"model record must be a dict, got {type(wire).__name__}")
        fields = read_field(wire, "fields", Mapping, default={}, record="model record")
        if len(fields) > MAX_CONFIG_FIELDS or not all(
            isinstance(name, str) and (value is None or isinstance(value, str | int | float | bool))
            for name, value in fields.items()
        ):
            raise MalformedRecord(
                f"model record 'fields' must map at most {MAX_CONFIG_FIELDS} names to scalars"
            )
        return cls(
            model_id=read_field(wire, "model", str),
            config_hash=read_field(wire, "config", str),
            n_blocks=read_field(wire, "blocks", int),
            config_fields=tuple(sorted(fields.items())),
        )


@dataclasses.dataclass(frozen=True)
class ServerRecord:
    """One server as it announces itself, stored under every block of its span.

    Attributes:
        peer_id: the owner (the DHT subkey; not repeated in the value).
        state: JOINING, ONLINE or DRAINING.
        span: the blocks it holds.
        throughput: tokens/s it can push through one block when batched; the unit of coverage.
        inference_rate: single-token inference steps/s through one block (routing latency).
        free_cache_tokens: more tokens of attention cache it can give a new session.
        load: requests queued or running now.
        addresses: transport endpoints, e.g. ``("tcp://1.2.3.4:31337",)``.
        curve_public_key: z85 CURVE key the transport must see when connecting.
        version: software version.
        next_rtts: measured round-trip seconds to servers of the following span, by peer id.
        device: e.g. ``"cuda:NVIDIA H100"``.
        dtype: e.g. ``"bfloat16"``.
        quant: weight quantization, e.g. ``"int8"`` (``"none"``; empty: an older peer that
            does not say). Clients pick spot-check partners by device, dtype and quant.
        started_at: DHT time the server started.
        reachability: the start-up reachability check's verdict (None: an older peer,
            read as direct).
        libp2p_peer: the libp2p peer id a relayed server is reached as (its data plane
            over libp2p: ``transport.Libp2pEndpoint``); empty for direct servers. Signed
            with the record, and checked against the authenticated remote of every stream.
        identity_key: the owner's raw Ed25519 identity key; its peer id must be ``peer_id``
            and ``curve_public_key`` must be its CURVE form (:func:`key_binding_error`).
    """

    peer_id: PeerId
    state: ServerState
    span: Span
    throughput: float
    inference_rate: float
    free_cache_tokens: int
    load: int
    addresses: tuple[str, ...]
    curve_public_key: bytes
    version: str
    next_rtts: Mapping[PeerId, float] = dataclasses.field(default_factory=dict)
    device: str = ""
    dtype: str = ""
    started_at: float = 0.0
    reachability: Reachability | None = None
    libp2p_peer: str = ""
    identity_key: bytes = b""
    quant: str = ""

    @property
    def relayed(self) -> bool:
        """Reached through libp2p (relay or hole punch), not by dialling its ZeroMQ address."""
        return self.reachability is not None and not self.reachability.direct and bool(self.libp2p_peer)

    def to_wire(self) -> dict[str, Any]:
        """Returns the msgpack-friendly dict stored in the DHT (without ``peer_id``)."""
        wire = self._core_wire()
        if self.reachability is not None:
            wire["reach"] = self.reachability.to_wire()
        if self.libp2p_peer:
            wire["p2p"] = self.libp2p_peer
        if self.identity_key:
            wire["ik"] = self.identity_key
        if self.quant:
            wire["quant"] = self.quant
        return wire

    def _core_wire(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "span": [self.span.start, self.span.end],
            "tput": float(self.throughput),
            "irate": float(self.inference_rate),
            "cache": int(self.free_cache_tokens),
            "load": int(self.load),
            "addrs": list(self.addresses),
            "curve": self.curve_public_key,
            "ver": self.version,
            "rtts": {str(peer): float(rtt) for peer, rtt in self.next_rtts.items()},
            "device": self.device,
            "dtype": self.dtype,
            "started": float(self.started_at),
        }

    @classmethod
    def from_wire(cls, peer_id: str, wire: Any) -> ServerRecord:
        """Parses a wire dict published by ``peer_id``; unknown fields are ignored.

        Raises:
            MalformedRecord: not a dict, or a field is missing, mistyped or out of range.
        """
        wire = read_wire_dict(wire, "server record")
        state = read_state(wire, ServerState, record="server record")
        span_wire = read_field(wire, "span", (list, tuple))
        if len(span_wire) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span_wire):
            raise MalformedRecord(f"span must be two integers, got {span_wire!r}")
        try:
            span = Span(*span_wire)
        except InvalidSpan as error:
            raise MalformedRecord(str(error)) from error
        addresses = read_field(wire, "addrs", (list, tuple))
        if not all(isinstance(address, str) for address in addresses):
            raise MalformedRecord("addresses must be strings")
        rtts = read_field(wire, "rtts", Mapping, {})
        if not all(isinstance(p, str) and isinstance(r, (int, float)) for p, r in rtts.items()):
            raise MalformedRecord("rtts must map peer ids to seconds")
        return cls(
            peer_id=PeerId(peer_id),
            state=state,
            span=span,
            throughput=_non_negative("tput", float(read_field(wire, "tput", (int, float)))),
            inference_rate=_non_negative("irate", float(read_field(wire, "irate", (int, float)))),
            free_cache_tokens=int(_non_negative("cache", read_field(wire, "cache", int))),
            load=int(_non_negative("load", read_field(wire, "load", int))),
            addresses=tuple(addresses),
            curve_public_key=read_field(wire, "curve", bytes),
            version=read_field(wire, "ver", str),
            next_rtts={PeerId(p): float(r) for p, r in rtts.items()},
            device=read_field(wire, "device", str, ""),
            dtype=read_field(wire, "dtype", str, ""),
            started_at=float(read_field(wire, "started", (int, float), 0.0)),
            reachability=read_reachability(wire, record="server record"),
            libp2p_peer=read_field(wire, "p2p", str, ""),
            identity_key=read_field(wire, "ik", bytes, b""),
            quant=read_field(wire, "quant", str, ""),
        )


def key_binding_error(record: ServerRecord) -> str | None:
    """Why ``record``'s data-plane key is not its signer's own, or None when it is.

    The DHT's validator has checked that the record is signed by the key whose peer id is
    ``record.peer_id``; this checks that the record names that key (``identity_key``) and
    that its CURVE key is that key's CURVE form. Without it, peer A could announce B's
    address and key (its clients would reach B, which does not hold what A claims; issue #14).
    """
    try:
        if peer_id_from_public_key(record.identity_key) != record.peer_id:
            return "its identity key is not its peer id's"
        if curve_public_key_of(record.identity_key) != record.curve_public_key:
            return "its CURVE key is not its identity key's"
    except ValueError as error:
        return f"no valid identity key ({error})"
    return None


def read_reachability(wire: Mapping[str, Any], *, record: str = "record") -> Reachability | None:
    """The start-up reachability verdict a record carries (None: a peer from before the check)."""
    if "reach" not in wire:
        return None
    try:
        return Reachability.from_wire(wire["reach"])
    except ValueError as error:
        raise MalformedRecord(f"{record}: {error}") from error


def server_record_entries(swarm: str, record: ServerRecord) -> dict[str, dict[str, Any]]:
    """The DHT entries that announce ``record``: one per block of its span.

    Returns:
        ``{block_key(swarm, i): record.to_wire()}`` for every block ``i`` of the span.
    """
    wire = record.to_wire()
    return {block_key(swarm, block): wire for block in range(record.span.start, record.span.end)}


def parse_server_listings(listings: Iterable[Mapping[str, PeerValue]]) -> dict[PeerId, ServerRecord]:
    """Merges per-block listings into one record per server.

    A server that moved may still be listed under its old blocks until those records
    expire; the record with the latest expiration wins. Tombstones (``None``) are dropped;
    malformed records, and records whose CURVE key is not their signer's
    (:func:`key_binding_error`), are logged and skipped.

    Args:
        listings: for each block key, ``{peer_id: PeerValue}`` found under it.

    Returns:
        The servers by peer id.
    """
    latest: dict[str, PeerValue] = {}
    for listing in listings:
        for peer_id, item in listing.items():
            if peer_id not in latest or item.expiration_time > latest[peer_id].expiration_time:
                latest[peer_id] = item
    servers: dict[PeerId, ServerRecord] = {}
    for peer_id, item in latest.items():
        if item.value is None:
            continue
        try:
            record = ServerRecord.from_wire(peer_id, item.value)
        except MalformedRecord as error:
            logger.warning("skipping malformed server record from %s: %s", peer_id, error)
            continue
        unbound = key_binding_error(record)
        if unbound is not None:
            logger.warning("skipping server record from %s: %s", peer_id, unbound)
            continue
        servers[PeerId(peer_id)] = record
    return servers


def choose_model_record(listing: Mapping[str, Any]) -> ModelRecord | None:
    """Picks the model record most peers announce; malformed ones are logged and skipped.

    Returns:
        The majority record, or None if no valid record exists.
    """
    votes: Counter[ModelRecord] = Counter()
    for peer_id, wire in listing.items():
        if wire is None:
            continue
        try:
            votes[ModelRecord.from_wire(wire)] += 1
        except MalformedRecord as error:
            logger.warning("skipping malformed model record from %s: %s", peer_id, error)
    if not votes:
        return None
    return max(votes.items(), key=lambda item: (item[1], item[0].config_hash))[0]

"""Training run records: what a training peer publishes, and the index of runs.

Two per-peer keys (the subkey is the publisher's peer id: records are signed per peer)::

    {swarm}.run.{run}   one TrainingPeerRecord per member of the run
    {swarm}.runs        the run index: {"run": NAME} per trainer, so readers find the runs

A trainer adds ``run_index_entry(swarm, run)`` next to its own record in what its
announcer publishes. The member record serves three readers: other members (addresses
and keys for matchmaking and state download, the round and parameter hash for
consistency), the health snapshot (loss curve, tokens/s, bytes per round), and
``swarm status``. Unknown fields are ignored; malformed records are logged and skipped.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from swarm.reachability import Reachability
from swarm.records import (
    check_name,
    is_valid_name,
    namespaced_key,
    read_field,
    read_reachability,
    read_state,
    read_wire_dict,
)
from swarm.swarm_errors import MalformedRecord

logger = logging.getLogger(__name__)

LOSS_HISTORY_LENGTH = 64
"""Rounds of loss kept in the record: enough for the health page's chart, small in the DHT."""
MAX_NAMED = 16
"""Most peers a record names as rejected, clipped or accused (a round's group is smaller)."""
MAX_RUNS = 32
"""Most runs a reader takes from the run index; a hostile index may list thousands."""


class TrainerState(enum.StrEnum):
    JOINING = "joining"
    """Downloading state from a peer; contributes a zero update in its first round."""
    TRAINING = "training"
    AVERAGING = "averaging"
    LEAVING = "leaving"


def run_key(swarm: str, run: str) -> str:
    """The key listing the members of a training run: ``{swarm}.run.{run}``."""
    return namespaced_key(swarm, "run", run)


def run_index_key(swarm: str) -> str:
    """The key where trainers list the runs they take part in: ``{swarm}.runs``."""
    return namespaced_key(swarm, "runs")


def run_index_entry(swarm: str, run: str) -> dict[str, dict[str, str]]:
    """The run index record a trainer publishes (add it to its announcer's output).

    Returns:
        ``{run_index_key(swarm): {"run": run}}``.

    Raises:
        ConfigurationError: the swarm or run name has characters other than letters, digits, ``_-``.
    """
    check_name(run, "--run")
    return {run_index_key(swarm): {"run": run}}  # run_index_key validates the swarm name


def parse_run_index(values: Iterable[Any]) -> list[str]:
    """The run names found in run index values; malformed ones are skipped.

    Args:
        values: the per-peer values under ``run_index_key``.

    Returns:
        Distinct valid run names, sorted, at most :data:`MAX_RUNS`.
    """
    names = set()
    for value in values:
        if isinstance(value, Mapping):
            name = value.get("run")
            if is_valid_name(name):
                names.add(name)
    return sorted(names)[:MAX_RUNS]


def _get(wire: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    return read_field(wire, name, types, default, record="training record")


@dataclasses.dataclass(frozen=True)
class TrainingPeerRecord:
    """One member of a run, as it announces itself.

    Attributes:
        state: joining, training, averaging or leaving.
        round: the outer round this peer's parameters are at.
        inner_step: inner steps done in total.
        loss: the latest inner training loss.
        loss_history: ``(round, loss)`` pairs, the last :data:`LOSS_HISTORY_LENGTH` rounds.
        tokens_per_second: inner-loop training speed.
        bytes_last_round: bytes this peer sent in the last all-reduce.
        members_last_round: group size of the last all-reduce.
        parameters_hash: BLAKE3 of ``theta_global`` after ``round`` (members must agree).
        addresses: transport endpoints (all-reduce, state download).
        curve_public_key: z85 CURVE key of those endpoints.
        bandwidth: declared bytes/s, sets this peer's all-reduce part size.
        version: software version.
        updated_at: DHT time of this record.
        reachability: the start-up reachability check's verdict (None: an older peer).
            A relayed member joins rounds with a zero reducer share.
        libp2p_peer: the libp2p peer id of this member's DHT daemon (base58): what a
            relayed member sees when this one calls it over libp2p ("": not announced).
        rejected: peer ids whose contribution this peer, as a reducer, dropped in its last
            round (not finite, or an invalid sample weight).
        clipped: peer ids whose contribution it clipped (weight or norm over the round's bound).
        accused: peer ids it caught, as a reducer, backup or member, returning a reduced
            part that disagreed with the recomputation that was used.
        fragments: P, the fragments the model syncs in (1: plain DiLoCo).
        fragment: the fragment the last outer step synced; with ``round`` it gives every
            fragment's own round (``swarm.training.fragments.fragment_rounds``).
        wait_seconds: how long the inner loop last waited for an exchange (streaming).
        inner_share: the share of wall time spent in inner steps since training started.
    """

    state: TrainerState
    round: int
    inner_step: int
    loss: float
    loss_history: tuple[tuple[int, float], ...]
    tokens_per_second: float
    bytes_last_round: int
    members_last_round: int
    parameters_hash: str
    addresses: tuple[str, ...]
    curve_public_key: bytes
    bandwidth: float
    version: str
    updated_at: float
    reachability: Reachability | None = None
    libp2p_peer: str = ""
    rejected: tuple[str, ...] = ()
    clipped: tuple[str, ...] = ()
    accused: tuple[str, ...] = ()
    fragments: int = 1
    fragment: int = 0
    wait_seconds: float = 0.0
    inner_share: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        wire = self._core_wire()
        if self.reachability is not None:
            wire["reach"] = self.reachability.to_wire()
        if self.libp2p_peer:
            wire["p2p"] = self.libp2p_peer
        return wire

    def _core_wire(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "round": self.round,
            "step": self.inner_step,
            "loss": float(self.loss),
            "losses": [[r, float(v)] for r, v in self.loss_history[-LOSS_HISTORY_LENGTH:]],
            "tps": float(self.tokens_per_second),
            "bytes": int(self.bytes_last_round),
            "members": int(self.members_last_round),
            "hash": self.parameters_hash,
            "addrs": list(self.addresses),
            "curve": self.curve_public_key,
            "bw": float(self.bandwidth),
            "ver": self.version,
            "at": float(self.updated_at),
            "rejected": list(self.rejected[:MAX_NAMED]),
            "clipped": list(self.clipped[:MAX_NAMED]),
            "accused": list(self.accused[:MAX_NAMED]),
            "frags": int(self.fragments),
            "frag": int(self.fragment),
            "wait": float(self.wait_seconds),
            "busy": float(self.inner_share),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> TrainingPeerRecord:
        """Parses a wire dict; unknown fields are ignored.

        Raises:
            MalformedRecord: not a dict, or a field is missing, mistyped or out of range.
        """
        wire = read_wire_dict(wire, "training record")
        state = read_state(wire, TrainerState, record="training record")
        history = []
        for item in _get(wire, "losses", (list, tuple), [])[-LOSS_HISTORY_LENGTH:]:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not isinstance(item[0], int)
                or not isinstance(item[1], (int, float))
            ):
                raise MalformedRecord(f"loss history entries must be [round, loss], got {item!r}")
            history.append((int(item[0]), float(item[1])))
        addresses = _get(wire, "addrs", (list, tuple))
        if not all(isinstance(address, str) for address in addresses):
            raise MalformedRecord("addresses must be strings")
        named = {}
        for name in ("rejected", "clipped", "accused"):
            peers = _get(wire, name, (list, tuple), [])
            if not all(isinstance(peer, str) for peer in peers):
                raise MalformedRecord(f"{name} must list peer ids")
            named[name] = tuple(peers[:MAX_NAMED])
        record = cls(
            state=state,
            round=_get(wire, "round", int),
            inner_step=_get(wire, "step", int),
            loss=float(_get(wire, "loss", (int, float))),
            loss_history=tuple(history),
            tokens_per_second=float(_get(wire, "tps", (int, float))),
            bytes_last_round=_get(wire, "bytes", int),
            members_last_round=_get(wire, "members", int),
            parameters_hash=_get(wire, "hash", str),
            addresses=tuple(addresses),
            curve_public_key=_get(wire, "curve", bytes),
            bandwidth=float(_get(wire, "bw", (int, float))),
            version=_get(wire, "ver", str),
            updated_at=float(_get(wire, "at", (int, float))),
            reachability=read_reachability(wire, record="training record"),
            libp2p_peer=_get(wire, "p2p", str, ""),
            **named,
            fragments=_get(wire, "frags", int, 1),
            fragment=_get(wire, "frag", int, 0),
            wait_seconds=float(_get(wire, "wait", (int, float), 0.0)),
            inner_share=float(_get(wire, "busy", (int, float), 0.0)),
        )
        if record.round < 0 or record.inner_step < 0 or record.bandwidth <= 0:
            raise MalformedRecord("round and step must be >= 0 and bandwidth > 0")
        if not 0 <= record.fragment < record.fragments:
            raise MalformedRecord("fragment must be in [0, fragments)")
        return record


def parse_run_listing(listing: Mapping[str, Any]) -> dict[str, TrainingPeerRecord]:
    """The members of a run by peer id; tombstones dropped, malformed records logged and skipped."""
    members = {}
    for peer_id, wire in listing.items():
        if wire is None:
            continue
        try:
            members[peer_id] = TrainingPeerRecord.from_wire(wire)
        except MalformedRecord as error:
            logger.warning("skipping malformed training record from %s: %s", peer_id, error)
    return members

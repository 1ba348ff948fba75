"""Who is in a training run: this member's view of the run's records in the DHT.

Every member publishes a :class:`~swarm.training.progress.TrainingPeerRecord` under
the run's key (with the peer id as subkey) and refreshes it before it expires; the
run's entry in the swarm's run index is published with it, so the health page finds
the run. The same listing tells a member who takes part in rounds (the live members
the :class:`~swarm.training.matchmaking.Matchmaker` picks a leader among), who is
already averaging (a slower member then ends its inner phase early), and who could
give it the latest state (:mod:`swarm.training.state`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

from swarm.dht import SwarmDHT
from swarm.training.progress import (
    TrainerState,
    TrainingPeerRecord,
    parse_run_listing,
    run_index_entry,
    run_key,
)
from transport.errors import SwarmError

logger = logging.getLogger(__name__)

_RELIST_SECONDS = 2.0
"""An unknown libp2p caller makes the run's records be read again at most this often."""

_ACTIVE = (TrainerState.TRAINING, TrainerState.AVERAGING)
"""States of members that take part in rounds."""


class RunMembership:
    """Reads the members of run ``run`` and publishes this member's record.

    Args:
        dht: a started DHT of the swarm.
        run: the run's name.
        record_ttl: seconds a published record lives unless refreshed.
    """

    def __init__(self, dht: SwarmDHT, run: str, record_ttl: float):
        self.relayed: set[str] = set()  # live members behind NAT, as of the last live_addresses()
        self._curve_keys: dict[bytes, bytes] = {}  # libp2p peer id -> CURVE key, as of the last listing
        self._listed_at = -math.inf
        self.dht = dht
        self.run = run
        self.record_ttl = record_ttl
        self.peer_id = str(dht.peer_id)
        self.key = run_key(dht.swarm_name, run)

    async def publish(self, record: TrainingPeerRecord) -> None:
        """Publish this member's record (and the run index entry); a DHT failure is logged, not raised."""
        entries = {self.key: record.to_wire(), **run_index_entry(self.dht.swarm_name, self.run)}
        try:
            await self.dht.publish_many(entries, ttl=self.record_ttl)
        except SwarmError as error:
            logger.warning("could not publish progress: %s", error)

    async def members(self) -> dict[str, TrainingPeerRecord]:
        """Every member with a fresh record, by peer id (this one included).

        Raises:
            SwarmError: the DHT lookup failed.
        """
        listing = await self.dht.list(self.key)
        members = parse_run_listing({peer: item.value for peer, item in listing.items()})
        self._listed_at = time.monotonic()
        claims = Counter(record.libp2p_peer for record in members.values() if record.libp2p_peer)
        # a peer id two records claim names no one: a member cannot take over another's calls
        self._curve_keys = {
            record.libp2p_peer.encode(): record.curve_public_key
            for record in members.values()
            if record.libp2p_peer and claims[record.libp2p_peer] == 1
        }
        return members

    async def curve_key_of(self, libp2p_peer: bytes) -> bytes | None:
        """The CURVE key of the member whose signed record announces libp2p peer id
        ``libp2p_peer``, or None (the listing is read again when it is not known yet, at
        most every :data:`_RELIST_SECONDS`, so strangers' calls cannot flood the DHT)."""
        stale = time.monotonic() - self._listed_at > _RELIST_SECONDS
        if libp2p_peer not in self._curve_keys and stale:
            try:
                await self.members()
            except SwarmError as error:
                logger.warning("could not read the run's members: %s", error)
        return self._curve_keys.get(libp2p_peer)

    async def others_active(self) -> dict[str, TrainingPeerRecord]:
        """The other members that take part in rounds (training or averaging).

        Raises:
            SwarmError: the DHT lookup failed.
        """
        return {
            peer: record
            for peer, record in (await self.members()).items()
            if peer != self.peer_id and record.state in _ACTIVE
        }

    async def live_addresses(self) -> dict[str, tuple[str, bytes]]:
        """``{peer_id: (address, public_key)}`` of the members that take part in rounds (for matchmaking).

        Also updates ``relayed``: those of them behind NAT (reached through relays).
        """
        live = {
            peer: record
            for peer, record in (await self.members()).items()
            if record.state in _ACTIVE and record.addresses
        }
        self.relayed = {
            peer for peer, r in live.items() if r.reachability is not None and not r.reachability.direct
        }
        return {peer: (record.addresses[0], record.curve_public_key) for peer, record in live.items()}

    async def others_averaging(self, round_index: int) -> bool:
        """Whether another member is averaging round ``round_index`` already (False when unsure)."""
        try:
            members = await self.members()
        except SwarmError:
            return False
        return any(
            peer != self.peer_id
            and record.state == TrainerState.AVERAGING
            and record.round == round_index
            and record.addresses
            for peer, record in members.items()
        )

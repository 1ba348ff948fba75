"""``BanList``: servers that failed are avoided for a while, longer each time they fail again.

A ban is tied to the evidence it was made on (the banned server's ``started_at``, which a
restarted server announces anew): fresh evidence (:meth:`BanList.lift_restarted`) lifts
it at once, and a repeat offender's backoff decays: a failure more than ``max_seconds``
after the previous ban ended starts over at ``base_seconds``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

from transport.errors import ConfigurationError

Clock = Callable[[], float]


@dataclasses.dataclass
class _Entry:
    failures: int
    until: float
    evidence: object = None  # what the ban was made on (the server's announced start time)


class BanList:
    """Exponential-backoff bans by peer id (Petals: 15 s, doubling).

    Args:
        base_seconds: length of the first ban.
        factor: each further consecutive failure multiplies the ban by this.
        max_seconds: bans never last longer than this.
        clock: monotonic seconds (inject a fake one in tests).

    Raises:
        ConfigurationError: non-positive durations or a factor below 1.
    """

    def __init__(
        self,
        base_seconds: float = 15.0,
        factor: float = 2.0,
        max_seconds: float = 600.0,
        clock: Clock = time.monotonic,
    ):
        if base_seconds <= 0 or max_seconds < base_seconds or factor < 1:
            raise ConfigurationError("ban durations must be positive, max >= base, factor >= 1")
        self.base_seconds = base_seconds
        self.factor = factor
        self.max_seconds = max_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def ban(self, peer_id: str, evidence: object = None) -> float:
        """Records a failure of ``peer_id`` and bans it.

        A failure long after the previous ban ended (more than ``max_seconds``) starts the
        backoff over.

        Args:
            peer_id: the server that failed.
            evidence: what identifies the failed incarnation of the server (its record's
                ``started_at``); :meth:`lift_restarted` lifts the ban once it changes.

        Returns:
            The ban's length in seconds.
        """
        now = self._clock()
        entry = self._entries.get(peer_id)
        failures = 1
        if entry is not None and now - entry.until <= self.max_seconds:
            failures = entry.failures + 1
        duration = min(self.base_seconds * self.factor ** (failures - 1), self.max_seconds)
        self._entries[peer_id] = _Entry(failures, now + duration, evidence)
        return duration

    def lift_restarted(self, current: Mapping[str, object]) -> list[str]:
        """Lifts the bans of servers whose evidence changed (they restarted and re-announced).

        Args:
            current: peer id -> its evidence now (e.g. ``started_at`` of its newest record).

        Returns:
            the peer ids whose ban was lifted.
        """
        now = self._clock()
        lifted = []
        for peer_id, entry in list(self._entries.items()):
            fresh = current.get(peer_id)
            if (
                now < entry.until
                and entry.evidence is not None
                and fresh is not None
                and fresh != entry.evidence
            ):
                del self._entries[peer_id]
                lifted.append(peer_id)
        return lifted

    def forgive(self, peer_id: str) -> None:
        """Forgets ``peer_id``'s failures (call after it served a request well)."""
        self._entries.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is banned now."""
        entry = self._entries.get(peer_id)
        return entry is not None and self._clock() < entry.until

    def banned(self) -> frozenset[str]:
        """All peers banned now (pass as ``excluded`` to routing)."""
        now = self._clock()
        return frozenset(peer for peer, entry in self._entries.items() if now < entry.until)

    def remaining(self, peer_id: str) -> float:
        """Seconds until ``peer_id``'s ban ends (0 if not banned)."""
        entry = self._entries.get(peer_id)
        return max(0.0, entry.until - self._clock()) if entry is not None else 0.0

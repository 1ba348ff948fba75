"""``TelemetryFreshness``: which signed telemetry messages are new, and which are replays.

A signature proves who wrote a message, not when: anyone who saw a peer's old message can
publish it again (issue #14). Each message carries the sender's ``sent_at`` and the
``session`` (broker connection) it belongs to, and a reader keeps, per peer, the newest
``sent_at`` it accepted. A message is accepted when:

- it is newer than every message accepted from that peer, not older than ``max_age``
  and not more than ``max_skew`` ahead of the reader's clock (peers' clocks differ by
  seconds); or
- it is the last will of the peer's current session, the first time it is seen. The
  broker publishes a will long after it was signed (at connect), so its ``sent_at`` is
  old; it counts only for the session it belongs to, once. A will the reader cannot
  place (a peer it has heard nothing from yet) is accepted only while it is fresh.

Anything else is a replay (an old message, a will of an earlier session, a will seen
twice) or stale (too old or from the future), and is dropped. Replaying the current
session's will once marks a live peer offline until its next message; the DHT view,
which the page is built from, is not affected. Pure logic: the clock is passed in.
"""

from __future__ import annotations

import dataclasses
import math

from swarm.telemetry import PeerTelemetry


@dataclasses.dataclass
class _Seen:
    newest: float  # the newest sent_at accepted
    session: str  # the session of the newest message accepted
    will_taken: bool  # the will of that session was accepted


class TelemetryFreshness:
    """Remembers, per peer, the newest message accepted.

    Args:
        max_age: oldest message (seconds before now) accepted, the last will of a known
            session excepted.
        max_skew: how far ahead of the reader's clock a message may be dated, in seconds.
        max_peers: peers remembered; beyond that the oldest entries are forgotten.
    """

    def __init__(self, *, max_age: float = 300.0, max_skew: float = 30.0, max_peers: int = 20_000):
        if not max_age > 0 or not max_skew >= 0:
            raise ValueError(f"--telemetry-max-age must be positive, got {max_age}")
        self.max_age = max_age
        self.max_skew = max_skew
        self.max_peers = max_peers
        self._seen: dict[str, _Seen] = {}

    def judge(self, peer: str, message: PeerTelemetry, now: float) -> str | None:
        """Accepts ``message`` from ``peer`` (and remembers it), or says why not.

        Returns:
            None when accepted, else ``"replayed"`` or ``"stale"``.
        """
        seen = self._seen.get(peer)
        if not math.isfinite(message.sent_at) or message.sent_at > now + self.max_skew:
            return "stale"
        if message.will:
            if seen is None:
                if now - message.sent_at > self.max_age:
                    return "stale"
                self._remember(peer, _Seen(message.sent_at, message.session, will_taken=True))
                return None
            if message.session != seen.session or seen.will_taken:
                return "replayed"
            seen.will_taken = True
            return None
        if seen is not None and message.sent_at <= seen.newest:
            return "replayed"
        if now - message.sent_at > self.max_age:
            return "stale"
        if seen is None or seen.session != message.session:
            self._remember(peer, _Seen(message.sent_at, message.session, will_taken=False))
        else:
            seen.newest = message.sent_at
        return None

    def _remember(self, peer: str, seen: _Seen) -> None:
        self._seen.pop(peer, None)
        self._seen[peer] = seen  # insertion order: the least recently (re)started peers first
        while len(self._seen) > self.max_peers:
            del self._seen[next(iter(self._seen))]

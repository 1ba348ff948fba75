"""How much this peer relays for others: limits on the libp2p daemon's circuit relay service.

Every reachable peer of a hivemind swarm is a circuit relay for peers behind NAT, and
relays are other people's machines: a home user lends upload bandwidth. ``p2pd``
(hivemind's daemon) can bound its relay service, and these are all the bounds it has:

- ``max_circuits``: open relayed connections *per relayed peer* (``-relayMaxCircuits``);
- ``max_reservations``: peers that may hold a relay slot here at once
  (``-relayMaxReservations``), so at most ``max_reservations * max_circuits`` circuits;
- ``data_limit_bytes``: bytes relayed *per circuit and direction* before the circuit
  is reset (``-relayDataLimit``; the relayed peers reconnect and start a new one);
- ``time_limit``: seconds one circuit lives (``-relayTimeLimit``).

There is no total byte or rate cap across circuits in p2pd; the most this peer can
have in flight is the product of the counts, and ``enabled=False`` turns the service
off entirely (``-relayService=0``; this peer still *uses* relays when it needs them).

hivemind's ``P2P.create`` does not pass these flags, so the DHT process builds its
daemon through ``bounded_p2p_class``: the same class with these flags appended.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hivemind.p2p import P2P

from transport.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class RelayLimits:
    """What one peer relays for others (the defaults are p2pd's own).

    Attributes:
        enabled: relay for peers behind NAT at all (``--relay-service``).
        max_reservations: peers that may reserve a relay slot here (``--relay-max-reservations``).
        max_circuits: open circuits per relayed peer (``--relay-max-circuits``).
        data_limit_bytes: bytes per circuit and direction before it is reset
            (``--relay-data-limit``; 4 GiB).
        time_limit: seconds one circuit may stay open (``--relay-time-limit``; 30 min).
    """

    enabled: bool = True
    max_reservations: int = 128
    max_circuits: int = 16
    data_limit_bytes: int = 4 * 2**30
    time_limit: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_circuits", "data_limit_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(
                    f"--relay-{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.time_limit <= 0:
            raise ConfigurationError(f"--relay-time-limit must be positive, got {self.time_limit!r}")

    def daemon_flags(self) -> dict[str, Any]:
        """The p2pd command-line flags (name -> value) that apply these limits."""
        return {
            "relayService": int(self.enabled),
            "relayMaxReservations": self.max_reservations,
            "relayMaxCircuits": self.max_circuits,
            "relayDataLimit": self.data_limit_bytes,
            "relayTimeLimit": f"{self.time_limit:g}s",
        }


def bounded_p2p_class(limits: RelayLimits) -> type[P2P]:
    """hivemind's ``P2P`` whose daemons start with ``limits`` (``P2P.create`` otherwise unchanged)."""
    flags = limits.daemon_flags()

    class BoundedRelayP2P(P2P):
        def _make_process_args(self, *args: Any, **kwargs: Any) -> list[str]:  # type: ignore[override]
            return P2P._make_process_args(*args, **{**kwargs, **flags})

    return BoundedRelayP2P

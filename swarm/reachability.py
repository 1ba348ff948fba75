"""The reachability check: can other peers dial this one, or must they go through a relay?

Before a peer announces itself ONLINE (serving) or joins a round (training), it asks up
to five peers already in the swarm to dial back the addresses it is about to announce
(Petals' rule, ``src/petals/server/reachability.py``): its DHT multiaddrs and its
ZeroMQ data-plane address. It is *direct* when at least half of the peers that answered
reached it, *relayed* otherwise. The first peer of a swarm has nobody to ask and
assumes direct; ``--reachability direct|relayed`` skips the check.

The question travels over the data plane (``DialBack``, answered by every peer that
calls ``serve_dial_back``), not through the DHT: the answer must come from a fresh
connection *to* the asker, and the data plane lets the checker open one of each kind
itself, with deadlines we control:

- data plane: a fresh ZeroMQ connection to the announced address with the asker's CURVE
  key, i.e. a TCP connect, the encrypted handshake and a ping (proves it is that peer);
- DHT: a TCP connect to each announced ``/ip4|ip6/.../tcp/...`` multiaddr (proves the
  port accepts inbound connections; libp2p would reuse the asker's own connection to
  the checker, so a libp2p dial proves nothing). Relay (``p2p-circuit``) addresses are
  not dialled.

A checker dials only what the asker announced, at most ``MAX_DIALED_ADDRESSES`` per
question and ``MAX_CONCURRENT_CHECKS`` questions at once, each within its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

from transport import (
    BaseEndpoint,
    Endpoint,
    Message,
    RequestContext,
    ServerBusy,
    SwarmError,
    Timeouts,
    message,
)
from transport.errors import ConfigurationError

logger = logging.getLogger(__name__)

ReachabilityMode = Literal["auto", "direct", "relayed"]
MAX_DIALED_ADDRESSES = 8
MAX_CONCURRENT_CHECKS = 4


@dataclasses.dataclass(frozen=True)
class ReachabilityConfig:
    """How a peer learns whether it is reachable.

    Attributes:
        mode: ``auto`` runs the check; ``direct`` or ``relayed`` says so without asking
            (``--reachability``).
        max_checkers: peers asked at most (Petals: 5).
        dial_timeout: seconds a checker spends on each dial back.
        ask_timeout: seconds the asker waits for one checker's whole answer.
    """

    mode: ReachabilityMode = "auto"
    max_checkers: int = 5
    dial_timeout: float = 5.0
    ask_timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "direct", "relayed"):
            raise ConfigurationError(f"--reachability must be auto, direct or relayed, got {self.mode!r}")
        if self.max_checkers < 1:
            raise ConfigurationError(f"--reachability-checkers must be >= 1, got {self.max_checkers}")
        if self.dial_timeout <= 0 or self.ask_timeout <= self.dial_timeout:
            raise ConfigurationError("reachability timeouts: need 0 < dial_timeout < ask_timeout")


@dataclasses.dataclass(frozen=True)
class Reachability:
    """The verdict: ``direct`` (dial me) or relayed (reach me through libp2p), and why.

    Attributes:
        direct: other peers can dial this peer's announced addresses.
        reason: one line for people (printed at start-up, shown on the health page).
        asked: peers that answered the question (0: not checked).
        confirmed: of those, how many reached every kind of address.
    """

    direct: bool
    reason: str
    asked: int = 0
    confirmed: int = 0

    @property
    def mode(self) -> str:
        return "direct" if self.direct else "relayed"

    def to_wire(self) -> dict[str, Any]:
        return {
            "direct": self.direct,
            "reason": self.reason,
            "asked": self.asked,
            "confirmed": self.confirmed,
        }

    @classmethod
    def from_wire(cls, value: Any) -> Reachability:
        """Parses a record's field. Raises ``ValueError`` on anything malformed."""
        if not isinstance(value, dict) or not isinstance(value.get("direct"), bool):
            raise ValueError(f"malformed reachability {value!r}")
        reason, asked, confirmed = value.get("reason", ""), value.get("asked", 0), value.get("confirmed", 0)
        if not isinstance(reason, str) or not all(type(n) is int and n >= 0 for n in (asked, confirmed)):
            raise ValueError(f"malformed reachability {value!r}")
        return cls(value["direct"], reason[:200], asked, confirmed)


@message("swarm.dial_back")
class DialBack(Message):
    """Please dial me back at these addresses (the ones I am about to announce)."""

    dht_maddrs: list[str]
    data_address: str
    public_key: bytes  # the CURVE key the data-plane address must prove


@message("swarm.dial_back_reply")
class DialBackReply(Message):
    dht_reached: bool
    data_reached: bool
    detail: str


def tcp_target(maddr: str) -> tuple[str, int] | None:
    """(host, port) of a direct ``/ip4|ip6/<host>/tcp/<port>[/...]`` multiaddr; None otherwise."""
    parts = maddr.split("/")
    if "p2p-circuit" in parts or len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        port = int(parts[4])
    except ValueError:
        return None
    return (parts[2], port) if 0 < port < 65536 else None


async def _dial_tcp(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _dial_data_plane(address: str, public_key: bytes, timeout: float) -> str | None:
    """None when a fresh, encrypted connection to ``address`` proved ``public_key``; else why not."""
    if not address.startswith("tcp://"):
        return f"not a direct address: {address}"
    try:
        async with Endpoint(timeouts=Timeouts(connect=timeout, request=timeout)) as prober:
            await prober.connect(address, public_key)
    except SwarmError as error:
        return f"{type(error).__name__}: {error}"
    return None


def serve_dial_back(endpoint: BaseEndpoint, *, dial_timeout: float = 5.0) -> None:
    """Answer other peers' reachability questions on ``endpoint``."""
    running = 0

    async def answer(request: DialBack, context: RequestContext) -> DialBackReply:
        nonlocal running
        if running >= MAX_CONCURRENT_CHECKS:
            raise ServerBusy("too many reachability checks at once")
        targets = [t for t in map(tcp_target, request.dht_maddrs[:MAX_DIALED_ADDRESSES]) if t is not None]
        running += 1
        try:  # every dial at once: an answer takes one dial_timeout at most
            data_failure, *dht_results = await asyncio.gather(
                _dial_data_plane(request.data_address, request.public_key, dial_timeout),
                *(_dial_tcp(host, port, dial_timeout) for host, port in targets),
            )
        finally:
            running -= 1
        detail = f"dht {sum(dht_results)}/{len(targets)} direct maddrs; data plane {data_failure or 'ok'}"
        return DialBackReply(any(dht_results), data_failure is None, detail)

    endpoint.add_handler(DialBack, answer)


async def check_reachability(
    endpoint: BaseEndpoint,
    checkers: Sequence[tuple[str, bytes]],
    *,
    dht_maddrs: Sequence[str],
    data_address: str,
    public_key: bytes,
    config: ReachabilityConfig = ReachabilityConfig(),
) -> Reachability:
    """Ask peers already in the swarm whether they can dial this peer back.

    Args:
        endpoint: this peer's endpoint (it calls the checkers).
        checkers: (data-plane address, public key) of peers already in the swarm, most
            trusted first; the first ``config.max_checkers`` are asked.
        dht_maddrs: the DHT multiaddrs this peer is about to announce.
        data_address: the ZeroMQ address it is about to announce.
        public_key: its CURVE public key.
        config: the mode and deadlines.
    Returns:
        the verdict; never raises for an unreachable or misbehaving checker.
    """
    if config.mode != "auto":
        return Reachability(config.mode == "direct", f"set by --reachability {config.mode}")
    asked = list(checkers)[: config.max_checkers]
    if not asked:
        return Reachability(True, "first peer of the swarm: nobody to ask, assuming direct")
    question = DialBack(list(dht_maddrs), data_address, public_key)

    async def ask(address: str, key: bytes) -> DialBackReply | None:
        try:
            async with asyncio.timeout(config.ask_timeout):
                connection = await endpoint.connect(address, key)
                try:
                    reply = await connection.call(question, timeout=config.ask_timeout)
                finally:
                    await connection.close()
        except (SwarmError, TimeoutError) as error:
            logger.info("reachability checker %s did not answer: %s", address, error)
            silent.append(f"{address}: {type(error).__name__} {error}")
            return None
        return reply if isinstance(reply, DialBackReply) else None

    silent: list[str] = []
    replies = [r for r in await asyncio.gather(*(ask(a, k) for a, k in asked)) if r is not None]
    if not replies:
        return Reachability(True, f"none of {len(asked)} peers answered ({silent[0][:120]}): assuming direct")
    confirmed = sum(1 for reply in replies if reply.dht_reached and reply.data_reached)
    direct = 2 * confirmed >= len(replies)
    verdict = "direct" if direct else "relayed"
    reason = f"{confirmed} of {len(replies)} peers dialled us back: {verdict}"
    if not direct:
        reason += f" ({replies[0].detail})"
    if silent:
        reason += f"; {len(silent)} did not answer ({silent[0][:120]})"
    return Reachability(direct, reason, len(replies), confirmed)

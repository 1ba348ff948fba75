"""``SwarmDHT``: our handle on a hivemind DHT node, with signed per-peer records and deadlines.

hivemind runs the node in a child process and answers through futures; every wait here is
bounded by a deadline (``DHTConfig.request_timeout`` unless the call passes its own).
Records are published under the caller's peer id as subkey, signed (and sealed in a
private swarm) by ``SwarmRecordValidator``; expiration times are DHT times.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any

import hivemind
import hivemind.dht.node
import msgpack
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time

from swarm.identity import Identity, PeerId
from swarm.records import (
    ModelRecord,
    PeerValue,
    ServerRecord,
    block_key,
    choose_model_record,
    model_key,
    parse_server_listings,
    server_record_entries,
)
from swarm.relay import RelayLimits, bounded_p2p_class
from swarm.signing import SwarmRecordValidator
from swarm.swarm_errors import DHTStartError, RecordRejected
from transport.errors import ConfigurationError, DeadlineExceeded, MessageTooLarge

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DHTConfig:
    """How this peer joins the swarm's DHT.

    Attributes:
        swarm_name: namespace of every key (``--swarm``).
        initial_peers: multiaddrs of peers already in the swarm; empty starts a new swarm.
        host_maddrs: where to listen (port 0 picks a free one).
        announce_maddrs: addresses to advertise instead of the listening ones (NAT, relays).
        record_ttl: seconds a record lives unless refreshed (Petals: 240).
        max_clock_skew: seconds of DHT-clock disagreement between peers we tolerate.
        start_timeout: seconds to wait for the p2p daemon and bootstrap (hivemind's 15 s is
            its most common field failure).
        request_timeout: default deadline of one get/store, in seconds.
        client_mode: do not serve DHT requests (peers behind NAT, short-lived clients).
        use_relay: reach peers behind NAT through libp2p circuit relays, and relay for
            them when reachable (``relay_limits`` bounds that).
        use_auto_relay: behind NAT, hold a reservation on a reachable peer so others can
            reach this one through it (the daemon decides with AutoNAT, or
            ``force_reachability``).
        auto_nat: run AutoNAT (learn whether we are reachable; also enables hole punching).
        force_reachability: ``public`` or ``private`` overrides AutoNAT's verdict in the
            daemon (``private`` makes it take a relay reservation at once); None: AutoNAT.
        relay_limits: what this peer relays for others (``swarm.relay``).
    """

    swarm_name: str = "swarm"
    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    record_ttl: float = 240.0
    max_clock_skew: float = 30.0
    start_timeout: float = 60.0
    request_timeout: float = 10.0
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    auto_nat: bool = True
    force_reachability: str | None = None
    relay_limits: RelayLimits = dataclasses.field(default_factory=RelayLimits)

    def __post_init__(self) -> None:
        if self.force_reachability not in (None, "public", "private"):
            raise ConfigurationError(
                f"force_reachability must be public, private or None, got {self.force_reachability!r}"
            )
        if self.record_ttl <= 0:
            raise ConfigurationError(f"--record-ttl must be positive, got {self.record_ttl}")
        if self.start_timeout <= 0 or self.request_timeout <= 0:
            raise ConfigurationError("--start-timeout and --request-timeout must be positive")


# These run inside hivemind's DHT process (hence module-level, picklable).
async def _store_many(_dht, node, keys, values, expirations, subkeys):
    # hivemind reports, per key, the answer of whichever replica replied last, so one
    # refusing peer (e.g. an outsider in a private swarm) reads as failure. We count a
    # record as published when a replica accepted it or our own node holds it (our node
    # is a replica whenever our validator accepts the record).
    results = await node.store_many(keys, values, expirations, subkeys=subkeys)
    accepted = {}
    for key, subkey in zip(keys, subkeys, strict=True):
        ok = results.get((key, subkey), results.get(key, False))
        if not ok:
            local = node.protocol.storage.get(DHTID.generate(key))
            entry = local.value if local is not None else None
            ok = hasattr(entry, "get") and entry.get(subkey) is not None
        accepted[key] = bool(ok)
    return accepted


MAX_RECORD_BYTES = 64 * 1024
"""Largest value one record may carry (msgpack bytes, before signing). Values over about
256 KiB break the pipe between hivemind's DHT process and ours (issue #19); records are a
few hundred bytes, so this leaves room and catches a runaway field early."""


def _check_record_sizes(values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        size = len(msgpack.packb(value, use_bin_type=True))
        if size > MAX_RECORD_BYTES:
            raise MessageTooLarge(
                f"record under {key} is {size} bytes, over the {MAX_RECORD_BYTES}-byte limit"
            )


async def _get_many(_dht, node, keys):
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere).

    hivemind runs the DHT in a forked child; without this, SIGKILL of a peer leaves its
    DHT process (and the p2p daemon under it) running and announcing nothing, forever.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


async def _daemon_listen_maddr(_dht, node):
    return str(node.p2p.daemon_listen_maddr)


class _HandOffTolerantPipe:
    """The DHT process's end of the request pipe from its peer, surviving a lost descriptor hand-off.

    Every request carries its future's pipe end, which ``multiprocessing`` hands over as a
    file descriptor through the peer's resource sharer. A peer out of descriptors (a
    connection flood) accepts the hand-off's connection and then cannot duplicate the
    descriptor to send it: unpickling here raised ``EOFError``, which hivemind's loop does not
    catch, so the DHT process died and the peer could never announce again (seen in
    ``tests/test_serving_abuse.py``'s flood). Now that one request is dropped as a
    ``ConnectionError``, which the loop logs and survives; the peer's wait for it times out and
    its next request goes through. An end of the pipe itself (the peer is gone) still ends it.
    """

    def __init__(self, pipe: Any):
        self._pipe = pipe

    def recv(self) -> Any:
        message = self._pipe.recv_bytes()  # EOFError here: the peer closed its end
        try:
            return ForkingPickler.loads(message)
        except EOFError as error:
            raise ConnectionError(
                "a request from the peer was lost: its descriptor hand-off failed"
            ) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT process, dying with the peer that started it, its daemon's relay bounded,
    and surviving a request whose descriptor hand-off failed (``_HandOffTolerantPipe``)."""

    def __init__(self, *args: Any, relay_limits: RelayLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._relay_limits = relay_limits

    def run(self) -> None:
        _die_with_parent()
        # In this (child) process only: the node's daemon starts with the relay limits,
        # which hivemind's P2P.create does not pass (see swarm.relay).
        hivemind.dht.node.P2P = bounded_p2p_class(self._relay_limits)
        self._inner_pipe = _HandOffTolerantPipe(self._inner_pipe)
        super().run()


class SwarmDHT:
    """A running DHT node of one swarm. Use as a (sync or async) context manager.

    Args:
        identity: this peer's identity; records are published under ``identity.peer_id``.
        config: DHT settings.
        swarm_key: the private swarm's key (None: public swarm).
    """

    def __init__(self, identity: Identity, config: DHTConfig = DHTConfig(), swarm_key: bytes | None = None):
        self.identity = identity
        self.config = config
        self.validator = SwarmRecordValidator(
            identity, swarm_key, max_ttl=max(config.record_ttl, 1.0), max_clock_skew=config.max_clock_skew
        )
        self._dht: hivemind.DHT | None = None

    @property
    def peer_id(self) -> PeerId:
        """This peer's swarm id (the subkey of everything it publishes)."""
        return self.identity.peer_id

    @property
    def swarm_name(self) -> str:
        return self.config.swarm_name

    def start(self) -> None:
        """Starts the DHT node and waits until it is ready (at most ``config.start_timeout``).

        Raises:
            DHTStartError: the p2p daemon or bootstrap failed or timed out; the message
                carries hivemind's error (p2pd's last log line). Run with
                ``HIVEMIND_LOGLEVEL=DEBUG`` to see the daemon's whole log.
        """
        if self._dht is not None:
            return
        kwargs: dict[str, Any] = {
            "host_maddrs": list(self.config.host_maddrs),
            "startup_timeout": self.config.start_timeout,
            "client_mode": self.config.client_mode,
            "bootstrap_timeout": self.config.start_timeout / 2,
            "use_relay": self.config.use_relay,
            "use_auto_relay": self.config.use_auto_relay,
            "auto_nat": self.config.auto_nat,
        }
        if self.config.force_reachability is not None:
            kwargs["force_reachability"] = self.config.force_reachability
        if self.config.announce_maddrs:
            kwargs["announce_maddrs"] = list(self.config.announce_maddrs)
        dht = _DHTProcess(
            initial_peers=list(self.config.initial_peers) or None,
            start=False,
            record_validators=[self.validator],
            relay_limits=self.config.relay_limits,
            **kwargs,
        )
        try:
            dht.run_in_background(await_ready=True, timeout=self.config.start_timeout + 5)
        except BaseException as error:
            dht.shutdown()
            raise DHTStartError(
                f"DHT node failed to start within {self.config.start_timeout:.0f}s "
                f"(initial peers: {list(self.config.initial_peers) or 'none'}): "
                f"{type(error).__name__}: {error}. Set HIVEMIND_LOGLEVEL=DEBUG to see p2pd's log."
            ) from error
        self._dht = dht

    def shutdown(self) -> None:
        """Stops the node (idempotent). Its records expire on their own."""
        dht, self._dht = self._dht, None
        if dht is not None:
            dht.shutdown()

    def __enter__(self) -> SwarmDHT:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> SwarmDHT:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.shutdown)

    @property
    def _node(self) -> hivemind.DHT:
        if self._dht is None:
            raise RuntimeError("SwarmDHT is not started; call start() or use it as a context manager")
        return self._dht

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other peers can use as ``initial_peers`` to join through this one."""
        return [str(maddr) for maddr in self._node.get_visible_maddrs()]

    @property
    def libp2p_peer_id(self) -> str:
        """The libp2p peer id of this node's daemon (base58): the data plane's identity over libp2p."""
        return self._node.peer_id.to_base58()

    async def daemon_listen_maddr(self, *, timeout: float | None = None) -> str:
        """The control multiaddr of this node's p2p daemon, for ``Libp2pEndpoint(daemon=...)``."""
        future = self._node.run_coroutine(_daemon_listen_maddr, return_future=True)
        return await self._await(future, timeout, "daemon address lookup")

    async def _await(self, future: Any, timeout: float | None, what: str) -> Any:
        timeout = self.config.request_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError as error:
            future.cancel()
            if self._dht is not None and not self._dht.is_alive():  # nothing will ever answer
                raise DeadlineExceeded(
                    f"DHT {what} did not finish within {timeout:.1f}s: this peer's DHT process exited "
                    f"(code {self._dht.exitcode}), so it can no longer announce or look up; restart it"
                ) from error
            raise DeadlineExceeded(f"DHT {what} did not finish within {timeout:.1f}s") from error

    async def publish_many(
        self, values: Mapping[str, Any], *, ttl: float | None = None, timeout: float | None = None
    ) -> float:
        """Publishes ``values`` (key -> msgpack-friendly value) under this peer's id.

        Args:
            values: what to store; ``None`` withdraws this peer's record under that key.
            ttl: lifetime in seconds (default ``config.record_ttl``).
            timeout: deadline in seconds (default ``config.request_timeout``).

        Returns:
            The records' expiration time (DHT time).

        Raises:
            RecordRejected: no peer, not even this one, accepted some record (e.g. its lifetime
                exceeds the validators' limit). Refusals by *some* peers are not reported: an
                outsider's publish into a private swarm "succeeds" on its own node, and no
                member ever sees it.
            DeadlineExceeded: the store did not finish in time.
            MessageTooLarge: a value is over ``MAX_RECORD_BYTES`` (nothing is published).
        """
        if not values:
            return get_dht_time()
        _check_record_sizes(values)
        expiration = get_dht_time() + (self.config.record_ttl if ttl is None else ttl)
        keys = list(values)
        future = self._node.run_coroutine(
            functools.partial(
                _store_many,
                keys=keys,
                values=[values[key] for key in keys],
                expirations=expiration,
                subkeys=[self.peer_id] * len(keys),
            ),
            return_future=True,
        )
        result = await self._await(future, timeout, f"store of {len(keys)} keys")
        refused = sorted(str(key) for key, ok in result.items() if not ok)
        if refused:
            raise RecordRejected(
                f"no DHT peer accepted records {refused[:4]}{'...' if len(refused) > 4 else ''} from {self.peer_id}"
            )
        return expiration

    async def publish(
        self, key: str, value: Any, *, ttl: float | None = None, timeout: float | None = None
    ) -> float:
        """Publishes one per-peer record (see ``publish_many``)."""
        return await self.publish_many({key: value}, ttl=ttl, timeout=timeout)

    async def withdraw(
        self, keys: Sequence[str], *, ttl: float | None = None, timeout: float | None = None
    ) -> None:
        """Replaces this peer's records under ``keys`` with tombstones (DHT values cannot be deleted)."""
        await self.publish_many(dict.fromkeys(keys), ttl=ttl, timeout=timeout)

    async def list_many(
        self, keys: Sequence[str], *, timeout: float | None = None
    ) -> dict[str, dict[PeerId, PeerValue]]:
        """Lists the live per-peer records under each key.

        Values that are not per-peer dictionaries (foreign or garbage data) are logged and
        skipped; tombstones are dropped.

        Args:
            keys: DHT keys.
            timeout: deadline in seconds (default ``config.request_timeout``).

        Returns:
            ``{key: {peer_id: PeerValue}}``, with an empty dict for keys nothing lives under.

        Raises:
            DeadlineExceeded: the lookup did not finish in time.
        """
        keys = list(keys)
        if not keys:
            return {}
        future = self._node.run_coroutine(functools.partial(_get_many, keys=keys), return_future=True)
        found = await self._await(future, timeout, f"lookup of {len(keys)} keys")
        now = get_dht_time()
        listings: dict[str, dict[PeerId, PeerValue]] = {}
        for key in keys:
            listings[key] = {}
            entry = found.get(key)
            if entry is None or entry.value is None:
                continue
            if not isinstance(entry.value, dict):
                logger.warning(
                    "skipping DHT key %s: not a per-peer dictionary (%s)", key, type(entry.value).__name__
                )
                continue
            for subkey, item in entry.value.items():
                value = getattr(item, "value", None)
                expiration = getattr(item, "expiration_time", None)
                if not isinstance(subkey, str) or not isinstance(expiration, (int, float)):
                    logger.warning("skipping malformed entry under %s", key)
                    continue
                if value is not None and expiration >= now:
                    listings[key][PeerId(subkey)] = PeerValue(value, float(expiration))
        return listings

    async def list(self, key: str, *, timeout: float | None = None) -> dict[PeerId, PeerValue]:
        """Lists the live per-peer records under one key (see ``list_many``)."""
        return (await self.list_many([key], timeout=timeout))[key]

    async def announce_model(self, record: ModelRecord, *, timeout: float | None = None) -> float:
        """Publishes this peer's view of the served model. Returns the expiration time."""
        return await self.publish(model_key(self.swarm_name), record.to_wire(), timeout=timeout)

    async def get_model(self, *, timeout: float | None = None) -> ModelRecord | None:
        """The model most peers announce, or None if no peer announces one."""
        listing = await self.list(model_key(self.swarm_name), timeout=timeout)
        return choose_model_record({peer: item.value for peer, item in listing.items()})

    async def announce_server(self, record: ServerRecord, *, timeout: float | None = None) -> float:
        """Publishes ``record`` under every block of its span. Returns the expiration time."""
        return await self.publish_many(server_record_entries(self.swarm_name, record), timeout=timeout)

    async def list_servers(
        self, n_blocks: int, *, timeout: float | None = None
    ) -> dict[PeerId, ServerRecord]:
        """All live servers of blocks ``[0, n_blocks)``; malformed records are logged and skipped."""
        keys = [block_key(self.swarm_name, block) for block in range(n_blocks)]
        listings = await self.list_many(keys, timeout=timeout)
        return parse_server_listings(listings[key] for key in keys)

"""Emulated slow links for benchmarks and tests: latency and bandwidth applied inside the transport.

EMULATION ONLY. With ``SWARM_EMULATE_LINK`` set in a process's environment (for example
``SWARM_EMULATE_LINK="rtt_ms=20,mbit=100"``), every ZeroMQ endpoint that process creates
holds each message it receives as if it had crossed a link of that round trip and
bandwidth: the message is handed on ``rtt/2`` after the link has carried its bytes, in the
order it arrived. A message crosses one link from sender to receiver, and every receiver
applies it (servers to requests and pushes, clients to replies), so with the variable set
in every process each leg of a chain (client -> server, server -> server, server ->
client) costs one emulated one-way latency, as over a real wide-area link.

This replaces a user-space delaying proxy (``benchmarks/inference.py`` used one): the
proxy cost ~2 ms of its own per leg on a busy 2-core machine (a 4 KiB echo through it
took 4.3 ms at zero emulated latency against 0.26 ms direct). Here the delay is one
timer per burst of messages (a kernel timerfd on Linux, ``precise_timer.py``: on time with
no busy polling), no copy (the received frames themselves wait)
and no extra process or socket.

Unset (the default), nothing changes. The variable is read when an endpoint is created,
never at import.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transport import precise_timer
from transport.errors import ConfigurationError

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "SWARM_EMULATE_LINK"

_TIMER_SLACK = 0.0015
"""Without timerfd only: seconds before a message is due that its timer fires; the last
stretch is checked against the precise clock once per event-loop iteration (a busy loop),
so a leg is not ~1 ms longer than asked."""


@dataclass(frozen=True)
class EmulatedLink:
    """A link every received message is held for (emulation for benchmarks and tests).

    Attributes:
        one_way_s: latency of one direction, in seconds (half the round trip).
        bits_per_second: the link's bandwidth; 0 is unlimited (latency only).
    """

    one_way_s: float
    bits_per_second: float = 0.0

    def __post_init__(self) -> None:
        if self.one_way_s < 0 or self.bits_per_second < 0:
            raise ConfigurationError(f"{ENVIRONMENT_VARIABLE}: latency and bandwidth must be >= 0")

    @property
    def round_trip_ms(self) -> float:
        return self.one_way_s * 2000

    def to_environment(self) -> str:
        """The ``SWARM_EMULATE_LINK`` value that describes this link."""
        return f"rtt_ms={self.round_trip_ms:g},mbit={self.bits_per_second / 1e6:g}"

    @classmethod
    def parse(cls, text: str) -> EmulatedLink:
        """``"rtt_ms=20,mbit=100"`` (``mbit`` optional, 0 or absent: unlimited).

        Raises:
            ConfigurationError: anything else.
        """
        fields: dict[str, float] = {}
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            name, _, value = part.partition("=")
            if name not in ("rtt_ms", "mbit") or name in fields:
                raise ConfigurationError(
                    f"{ENVIRONMENT_VARIABLE}={text!r}: expected rtt_ms=<ms>[,mbit=<Mbit/s>]"
                )
            try:
                fields[name] = float(value)
            except ValueError:
                raise ConfigurationError(f"{ENVIRONMENT_VARIABLE}={text!r}: {name} is not a number") from None
        if "rtt_ms" not in fields:
            raise ConfigurationError(f"{ENVIRONMENT_VARIABLE}={text!r}: rtt_ms is required")
        return cls(fields["rtt_ms"] / 2000, fields.get("mbit", 0.0) * 1e6)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> EmulatedLink | None:
        """The link ``SWARM_EMULATE_LINK`` asks for, or None when it is unset or empty."""
        text = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, "").strip()
        if not text:
            return None
        link = cls.parse(text)
        log.warning("emulating a slow link on every received message (%s=%s): benchmarks and tests only",
                    ENVIRONMENT_VARIABLE, text)  # fmt: skip
        return link


class DelayLine:
    """One direction of one emulated link: items come out in arrival order, each once the link
    has carried its bytes (one after the other) plus the one-way latency.

    Args:
        link: the emulated link.
        deliver: called with each item when it is due (from an event-loop timer).
        on_empty: called once the line holds nothing (its owner may forget it).
    """

    def __init__(
        self, link: EmulatedLink, deliver: Callable[[Any], None], on_empty: Callable[[], None] | None = None
    ):
        self._link = link
        self._deliver = deliver
        self._on_empty = on_empty
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[float, Any]] = deque()  # (due, on time.monotonic(), item)
        self._link_free = 0.0  # when the link has carried the bytes queued so far
        self._timer: asyncio.Handle | None = None  # without timerfd
        self._precise: precise_timer.PreciseTimer | None = None
        self._armed = False

    def put(self, item: Any, size: int) -> None:
        """Holds ``item`` (``size`` bytes on the wire) until it is due."""
        now = time.monotonic()
        start = max(now, self._link_free)
        rate = self._link.bits_per_second
        self._link_free = start + (size * 8 / rate if rate else 0.0)
        self._queue.append((self._link_free + self._link.one_way_s, item))
        if not self._armed:
            self._schedule()

    def _schedule(self) -> None:
        self._armed = True
        if precise_timer.available():
            # the kernel wakes the loop when the first item is due: on time, no busy loop
            if self._precise is None:
                self._precise = precise_timer.PreciseTimer(self._loop, self._release)
            self._precise.arm(self._queue[0][0])
            return
        # Event-loop timers fire late by up to a millisecond or so (asyncio rounds its poll
        # timeout up to whole milliseconds, uvloop keeps time in milliseconds): wake up to
        # _TIMER_SLACK early and check the precise clock on each loop iteration from there.
        wait = self._queue[0][0] - time.monotonic() - _TIMER_SLACK
        if wait > 0:
            self._timer = self._loop.call_later(wait, self._release)
        else:
            self._timer = self._loop.call_soon(self._release)

    def _release(self) -> None:
        self._timer = None
        self._armed = False
        queue, now = self._queue, time.monotonic()
        while queue and queue[0][0] <= now:
            _, item = queue.popleft()
            try:
                self._deliver(item)
            except Exception:  # a timer callback: one bad delivery must not stop the line
                log.exception("delivering an emulated-link message failed")
        if queue:
            self._schedule()
            return
        self._close_timers()  # a line may be forgotten once empty: no descriptor left behind
        if self._on_empty is not None:
            self._on_empty()

    def close(self) -> None:
        """Drops whatever is held (its connection or socket closed)."""
        self._close_timers()
        self._queue.clear()

    def _close_timers(self) -> None:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._precise is not None:
            self._precise.close()
            self._precise = None


class DelayLines:
    """A ``DelayLine`` per sender (a server socket hears many clients, each over its own link).

    Args:
        link: the emulated link of every sender.
        deliver: called with each item when it is due.
    """

    def __init__(self, link: EmulatedLink, deliver: Callable[[Any], None]):
        self._link = link
        self._deliver = deliver
        self._lines: dict[Any, DelayLine] = {}

    def put(self, sender: Any, item: Any, size: int) -> None:
        line = self._lines.get(sender)
        if line is None:
            # forgotten once empty: its last item left after the link was free again
            line = DelayLine(self._link, self._deliver, lambda: self._lines.pop(sender, None))
            self._lines[sender] = line
        line.put(item, size)

    def close(self) -> None:
        for line in self._lines.values():
            line.close()
        self._lines.clear()


def frames_size(frames: list[Any]) -> int:
    """Bytes of a message's frames (what the link carries, envelope included)."""
    return sum(memoryview(frame).nbytes for frame in frames)

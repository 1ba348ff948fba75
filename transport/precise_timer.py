"""A one-shot event-loop timer that fires on time to the tens of microseconds (Linux timerfd).

Event-loop timers fire up to ~1 ms late: asyncio rounds its poll timeout up to whole
milliseconds and uvloop keeps time in milliseconds. ``PreciseTimer`` arms a kernel timer
(``timerfd``, ``CLOCK_MONOTONIC``: the clock of ``time.monotonic()``) and lets the loop
watch its descriptor, so the loop sleeps until the instant asked for and wakes then, with
no busy polling before it. The emulated links (``link_emulation.py``) hold messages on
it. Where timerfd is missing (not Linux), ``available()`` is False and callers fall back
to the loop's own timers.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p
        ]  # fmt: skip
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def available() -> bool:
    """Whether ``PreciseTimer`` works here (Linux with timerfd)."""
    return _LIBC is not None


class PreciseTimer:
    """Calls ``callback()`` on ``loop`` once the ``time.monotonic()`` instant given to :meth:`arm`
    has come. Re-arming replaces the instant; :meth:`close` releases the descriptor.

    Raises:
        OSError: the kernel refused a timer (``available()`` was False, or no descriptors left).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
        if _LIBC is None:
            raise OSError("timerfd is not available on this platform")
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        self._loop = loop
        self._callback = callback
        loop.add_reader(fd, self._fired)

    def arm(self, when: float) -> None:
        """Fire at ``when`` (``time.monotonic()`` seconds); a past instant fires at once."""
        when = max(when, 1e-9)  # all zeros would disarm
        seconds = int(when)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, int((when - seconds) * 1e9)))
        if _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiry count; clears readability
        except BlockingIOError:  # re-armed since it became readable
            return
        self._callback()

"""How an ``InferenceSession`` sorts the failures of its steps and openings.

A failure another server can fix (retryable) fails over; a session that merely ended
(expired while the client was busy) is reopened without a ban; whatever a step's task
group raises leaves ``step`` as its first documented error, never as an
``ExceptionGroup``. ``settle`` turns a call's ``SwarmError`` into its result, so one
hop's failure does not cancel the others' calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from transport.errors import RemoteError, StreamClosed, SwarmError


def session_lost(error: BaseException) -> bool:
    """The session ended (expired while the client was busy elsewhere): not the server's fault."""
    return isinstance(error, StreamClosed) or (
        isinstance(error, RemoteError) and error.kind == "StreamClosed"
    )


def first_documented_error(group: BaseExceptionGroup) -> BaseException:
    """The error to raise for ``group``: its first ``SwarmError`` or ``ValueError``, else its first leaf."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        elif not isinstance(error, asyncio.CancelledError):
            leaves.append(error)

    collect(group)
    for leaf in leaves:
        if isinstance(leaf, (SwarmError, ValueError)):
            return leaf
    return leaves[0] if leaves else group


def is_server_failure(error: BaseException) -> bool:
    """Failures that another server can fix; a fatal remote error is our own bug and is raised."""
    if isinstance(error, RemoteError):
        return error.retryable
    return isinstance(error, SwarmError) and error.retryable


async def settle(call: Awaitable[Any]) -> Any:
    """The call's result, or the SwarmError it raised (so one failure does not cancel the others)."""
    try:
        return await call
    except SwarmError as error:
        return error


async def raise_when_awaited(error: BaseException) -> Any:
    """An awaitable that raises ``error``: a call that failed before it was sent, settled like one that failed after."""
    raise error

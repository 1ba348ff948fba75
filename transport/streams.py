"""The server side of an ordered streaming session.

A client opens a session with an opening message; the server runs the stream
handler registered for that kind as one task per session. The handler sees the
session's steps strictly in the order the client sent them and answers each before
taking the next, so per-session state (a key/value cache) needs no locks; different
sessions run concurrently::

    async def serve_inference(stream: ServerStream) -> None:
        cache = allocate(stream.opening)          # raise ServerBusy here to refuse
        try:
            async for step in stream:             # accepts the session on first use
                await stream.reply(forward(cache, step))
        finally:
            release(cache)

A step can fail on its own without ending the session: answer it with
``reply_error`` and take the next step. The client's ``stream.call`` for that step
raises the error (``RemoteError`` with the class name and retryability, like a unary
handler's error), and later steps go on in the same session with its state intact::

        async for step in stream:
            if step.position != expected:           # the client can resend this step
                await stream.reply_error(ServerBusy("step out of order"))
                continue
            await stream.reply(forward(cache, step))

The session ends when the client closes it, when no step arrives for
``Timeouts.stream_idle`` seconds, or when the handler returns or raises (its error
answers the step in hand); later steps get ``StreamClosed``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from transport.control import StreamOpened, error_reply
from transport.errors import ServerBusy, StreamClosed
from transport.limits import Timeouts
from transport.messages import Message, PeerKey, SessionId


@dataclass(frozen=True)
class RequestContext:
    """Who sent a request.

    Attributes:
        peer_key: the sender's CURVE public key as authenticated by the transport
            (None on an unencrypted endpoint).
        session: the streaming session, for stream handlers.
    """

    peer_key: PeerKey | None
    session: SessionId | None = None


class Replies(Protocol):
    """How a stream answers its client, and returns the bytes its queued steps held: the
    dispatcher that owns the stream's route."""

    def reply(self, route: Any, request_id: int, msg: Message, session: SessionId | None) -> None: ...

    def reply_error(self, route: Any, request_id: int, error: BaseException) -> None: ...

    def release_bytes(self, owner: Any, size: int) -> None:
        """A queued step of ``size`` bytes from ``owner`` was taken or dropped (in-flight bytes)."""


class ServerStream:
    """One streaming session as its handler sees it.

    Attributes:
        opening: the message that opened the session.
        context: who opened it (``peer_key``, ``session``).
    """

    def __init__(
        self,
        dispatcher: Replies,
        opening: Message,
        context: RequestContext,
        route: Any,
        open_request_id: int,
        timeouts: Timeouts,
    ):
        self.opening = opening
        self.context = context
        self._dispatcher = dispatcher
        self._route = route
        self._owner = context.peer_key if context.peer_key is not None else route  # whose bytes
        self._open_request_id = open_request_id
        self._idle_timeout = timeouts.stream_idle
        self._accepted = False
        self._ended = False
        self._steps: deque[tuple[int, Message, int]] = deque()  # (request id, step, bytes)
        self._unanswered: int | None = None
        self._waiter: asyncio.Future | None = None

    def accept(self) -> None:
        """Tell the client the session is open (done by the first ``async for`` step)."""
        if not self._accepted:
            self._accepted = True
            self._dispatcher.reply(self._route, self._open_request_id, StreamOpened(), self.context.session)

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Message:
        """The next step, in client order.

        Raises:
            StopAsyncIteration: the session ended (closed by the client or idle too long).
            RuntimeError: the previous step has no reply yet.
        """
        self.accept()
        if self._unanswered is not None:
            raise RuntimeError("reply to the previous step before taking the next one")
        loop = asyncio.get_running_loop()
        while not self._steps:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = loop.create_future()
            timer = loop.call_later(self._idle_timeout, self._expire)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        request_id, step, size = self._steps.popleft()
        self._dispatcher.release_bytes(self._owner, size)
        self._unanswered = request_id
        return step

    async def reply(self, msg: Message) -> None:
        """Answer the current step with ``msg``.

        Raises:
            RuntimeError: there is no unanswered step.
        """
        self.reply_now(msg)

    def reply_now(self, msg: Message) -> None:
        """:meth:`reply` from synchronous code: the reply leaves before this returns.

        Raises:
            RuntimeError: there is no unanswered step.
        """
        if self._unanswered is None:
            raise RuntimeError("no step to reply to")
        request_id, self._unanswered = self._unanswered, None
        self._dispatcher.reply(self._route, request_id, msg, self.context.session)

    async def reply_error(self, error: BaseException) -> None:
        """Answer the current step with ``error``; the session stays open.

        The client's call for this step raises it (``RemoteError`` carrying the class
        name and ``retryable``; ``StreamClosed`` and ``NotAuthorized`` keep their class),
        its later steps are served as usual.

        Raises:
            RuntimeError: there is no unanswered step.
        """
        if self._unanswered is None:
            raise RuntimeError("no step to reply to")
        request_id, self._unanswered = self._unanswered, None
        self._dispatcher.reply(self._route, request_id, error_reply(error), self.context.session)

    # The dispatcher's side.

    def push(self, request_id: int, step: Message, route: Any, max_backlog: int, size: int = 0) -> None:
        """Queue a step of ``size`` bytes, counted by the dispatcher until the handler takes it
        (the client may have reconnected: reply on its newest route)."""
        if self._ended:
            raise StreamClosed("the streaming session is closing")
        if len(self._steps) >= max_backlog:
            raise ServerBusy(f"{len(self._steps)} steps queued in this session")
        self._route = route
        self._steps.append((request_id, step, size))
        self._wake()

    def end(self) -> None:
        """No more steps: the handler's ``async for`` ends after the queued ones."""
        self._ended = True
        self._wake()

    def _expire(self) -> None:
        self.end()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def finish(self, error: BaseException | None) -> None:
        """The handler is done: answer whatever it left unanswered."""
        self._ended = True
        closed = StreamClosed("the streaming session ended")
        if not self._accepted:
            self._accepted = True
            self._dispatcher.reply_error(self._route, self._open_request_id, error or closed)
        if self._unanswered is not None:
            self._dispatcher.reply_error(self._route, self._unanswered, error or closed)
            self._unanswered = None
        while self._steps:
            request_id, _, size = self._steps.popleft()
            self._dispatcher.release_bytes(self._owner, size)
            self._dispatcher.reply_error(self._route, request_id, closed)

"""The calling half of an endpoint: one ``Connection`` per server, independent of how
frames move (ZeroMQ or in-memory subclasses provide ``_send`` and ``_close``).

Many requests may be in flight on one connection; each carries an id and its own
deadline. A streaming session (``open_stream``) binds a sequence of steps to one
server-side handler that processes them in order.

A call ends in exactly one way, whichever comes first: its reply, its deadline
(``DeadlineExceeded``), or the peer going away (``PeerUnavailable``: the connection is
closed, or the transport saw the peer disconnect; a call to a peer that is known to
be gone fails at once instead of waiting for its deadline).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from transport.control import ErrorReply, Ping, Pong, StreamClose, StreamOpened, raise_error_reply
from transport.errors import (
    DeadlineExceeded,
    HandshakeTimeout,
    MalformedMessage,
    PeerUnavailable,
    StreamClosed,
    SwarmError,
)
from transport.limits import Limits, Timeouts
from transport.messages import (
    Message,
    MessageRegistry,
    PeerKey,
    SessionId,
    decode_body,
    decode_envelope,
    encode_message,
    salvage_request_id,
)


class Connection:
    """A client's link to one server.

    Attributes:
        address: where the server listens.
        server_key: the server's CURVE public key (None on an unencrypted link).
    """

    def __init__(
        self,
        address: str,
        server_key: PeerKey | None,
        registry: MessageRegistry,
        limits: Limits,
        timeouts: Timeouts,
        token: bytes | None,
    ):
        self.address = address
        self.server_key = server_key
        self._registry = registry
        self._limits = limits
        self._timeouts = timeouts
        self._token = token
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._on_closed: Callable[[Connection], None] | None = None  # the endpoint forgets it

    def _send(self, frames: list[Any], waiter: asyncio.Future | None, deadline: float) -> None:
        """Hand ``frames`` to the transport without blocking.

        They go out now, or queue behind earlier sends (send order is kept: the server
        sees a stream's steps in call order). A queued send that fails later fails
        ``waiter``; one whose ``waiter`` is done or whose ``deadline`` passed is dropped.

        Raises:
            PeerUnavailable: the frames can never go out (closed, or the peer is gone).
        """
        raise NotImplementedError

    async def _close(self, error: PeerUnavailable) -> None:
        """Release the transport; anything still waiting on it fails with ``error``."""
        raise NotImplementedError

    async def call(self, request: Message, *, timeout: float | None = None) -> Message:
        """Send ``request`` and wait for its reply.

        Args:
            request: a registered message with a handler on the server.
            timeout: seconds for the round trip; ``Timeouts.request`` when None.
        Returns:
            the handler's reply message.
        Raises:
            DeadlineExceeded: no reply in time.
            PeerUnavailable: the connection is closed or the peer went away.
            RemoteError: the server answered with an error (``.kind``, ``.retryable``).
            NotAuthorized: the server is a private swarm and we lack its key.
            MalformedMessage: the request (or the reply) does not match its declared types.
        """
        return await self._request(request, None, timeout)

    def send_call(self, request: Message, *, timeout: float | None = None) -> Awaitable[Message]:
        """:meth:`call`, with ``request`` sent before this returns (no event-loop turn first);
        await the result for the reply. For a caller whose message must leave before the
        loop handles anything else (a server's push right after its forward).

        Raises:
            PeerUnavailable: the connection is closed (here, not when awaited).
        """
        return self._finish(*self._begin(request, None, timeout))

    async def confirm_answering(self, address: str, deadline: float) -> None:
        """Pings the new connection before the connect ``deadline`` (loop time); closes it on failure.

        Raises:
            HandshakeTimeout: no answer by the deadline.
            SwarmError: the ping failed otherwise.
        """
        try:
            await self.ping(timeout=max(0.001, deadline - asyncio.get_running_loop().time()))
        except DeadlineExceeded:
            await self.close()
            raise HandshakeTimeout(f"{address} did not answer within the connect deadline") from None
        except BaseException:
            await self.close()
            raise

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip time to the server in seconds (also checks admission).

        Raises:
            the errors of :meth:`call`.
        """
        start = self._loop.time()
        reply = await self._request(Ping(), None, timeout)
        if not isinstance(reply, Pong):
            raise MalformedMessage(f"ping answered with {reply.kind}")
        return self._loop.time() - start

    async def open_stream(
        self,
        opening: Message,
        *,
        timeout: float | None = None,
        pipelined: bool = False,
        deferred: bool = False,
    ) -> ClientStream:
        """Open an ordered streaming session on the server's handler for ``opening``'s kind.

        Args:
            opening: the message that opens the session (its kind has a stream handler).
            timeout: seconds until the server accepts; ``Timeouts.request`` when None.
            pipelined: send the opening and return at once, without waiting for the server
                to accept: steps called next go out right behind it (the server queues them
                in the session), so the first step costs no extra round trip. A refused
                opening then fails those steps with the opening's own error, and
                ``stream.opened`` holds the outcome.
            deferred: pipelined, and the opening is not sent now but right ahead of the first
                step (``stream.opened`` is None until then): a client opening sessions on
                several servers sends each its opening and first step together, the first
                hop's before the others', instead of every opening first (issue #18: each
                server woke twice, and their wake-ups delayed the first hop's step).
                Nothing reaches the server if no step is sent.
        Returns:
            the session; use it as ``async with`` or ``close()`` it.
        Raises:
            the errors of :meth:`call` (``RemoteError`` with kind ``ServerBusy`` when refused);
            only ``PeerUnavailable`` when pipelined.
        """
        session = SessionId(secrets.token_bytes(16))
        if deferred:
            if self._closed:
                raise PeerUnavailable(f"connection to {self.address} is closed")
            return ClientStream(self, session, deferred_opening=(opening, timeout))
        begun = self._begin(opening, session, timeout)  # sent now, before any step
        if pipelined:
            return ClientStream(self, session, self._await_opening(begun))
        await self._confirm_opened(begun)
        return ClientStream(self, session)

    def _await_opening(self, begun: tuple[int, asyncio.Future, asyncio.TimerHandle]) -> asyncio.Future:
        """The outcome of an opening already sent, as a future nobody has to read."""
        opened = asyncio.ensure_future(self._confirm_opened(begun))
        opened.add_done_callback(_retrieve)
        return opened

    async def _confirm_opened(self, begun: tuple[int, asyncio.Future, asyncio.TimerHandle]) -> None:
        reply = await self._finish(*begun)
        if not isinstance(reply, StreamOpened):
            raise MalformedMessage(f"stream opening answered with {reply.kind}")

    async def _request(self, msg: Message, session: bytes | None, timeout: float | None) -> Message:
        return await self._finish(*self._begin(msg, session, timeout))

    def _begin(
        self, msg: Message, session: bytes | None, timeout: float | None
    ) -> tuple[int, asyncio.Future, asyncio.TimerHandle]:
        """Sends ``msg`` now; returns what :meth:`_finish` awaits its reply with."""
        if self._closed:
            raise PeerUnavailable(f"connection to {self.address} is closed")
        loop = self._loop
        timeout = self._timeouts.request if timeout is None else timeout
        request_id = next(self._ids)
        frames = encode_message(msg, request_id, session, self._token)
        # One future carries every outcome (reply, deadline, disconnect, a queued send's
        # failure), so nothing else is awaited and no exception is left unread.
        future = loop.create_future()
        self._pending[request_id] = future
        timer = loop.call_later(timeout, _expire, future, self.address, timeout)
        try:
            self._send(frames, future, loop.time() + timeout)
        except BaseException:
            timer.cancel()
            self._pending.pop(request_id, None)
            raise
        return request_id, future, timer

    async def _finish(self, request_id: int, future: asyncio.Future, timer: asyncio.TimerHandle) -> Message:
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    def notify(self, msg: Message) -> None:
        """Sends ``msg`` now, with no reply expected: the server's handler runs and its answer
        is not sent back (one the server cannot even decode still gets an error, which the
        connection drops). For a message whose acknowledgement nobody reads.

        Raises:
            PeerUnavailable: the connection is closed, or it cannot go out.
        """
        if self._closed:
            raise PeerUnavailable(f"connection to {self.address} is closed")
        self._notify(msg, None)

    def _notify(self, msg: Message, session: bytes | None) -> None:
        """Send ``msg`` with request id 0: the server does not answer.

        Raises:
            PeerUnavailable: it cannot go out.
        """
        if not self._closed:
            frames = encode_message(msg, 0, session, self._token)
            self._send(frames, None, self._loop.time() + self._timeouts.request)

    def deliver(self, frames: list[Any]) -> None:
        """Match a received reply to its pending call (the transport calls this)."""
        try:
            envelope = decode_envelope(frames, self._limits)
        except SwarmError as error:
            future = self._pending.pop(salvage_request_id(frames[0]) if frames else 0, None)
            if future is not None and not future.done():
                future.set_exception(error)
            return
        future = self._pending.pop(envelope.request_id, None)
        if future is None or future.done():
            return  # a late reply to a call that timed out or was cancelled
        try:
            reply = decode_body(self._registry.lookup(envelope.kind), envelope, frames, self._limits)
        except SwarmError as error:
            future.set_exception(error)
            return
        if type(reply) is ErrorReply:
            future.set_exception(raise_error_reply(reply))
        else:
            future.set_result(reply)

    def fail_pending(self, error: SwarmError) -> None:
        """Fail every pending call with ``error`` (the peer went away)."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Close the connection; pending calls fail with ``PeerUnavailable``. Idempotent."""
        await self._close_with(PeerUnavailable(f"connection to {self.address} closed"))

    async def _close_with(self, error: PeerUnavailable) -> None:
        if self._closed:
            return
        self._closed = True
        self.fail_pending(error)
        if self._on_closed is not None:
            self._on_closed(self)
        await self._close(error)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ClientStream:
    """An open streaming session: steps are processed by the server in call order.

    Attributes:
        session: the session id.
        opened: for a pipelined opening, the future of its outcome (a deferred one's once
            it is sent with the first step); None otherwise.
    """

    def __init__(
        self, connection: Connection, session: SessionId, opened: asyncio.Future | None = None,
        deferred_opening: tuple[Message, float | None] | None = None,
    ):  # fmt: skip
        self.session = session
        self.opened = opened
        self._connection = connection
        self._closed = False
        self._deferred_opening = deferred_opening  # (opening, its timeout): sent with the first step

    async def call(self, step: Message, *, timeout: float | None = None) -> Message:
        """Send one step and wait for the handler's reply to it.

        Several calls may be in flight; the server still handles them in send order.

        Raises:
            StreamClosed: the session ended (client close, idle expiry, handler done).
            the errors of :meth:`Connection.call`; for a pipelined session whose opening
            was refused, the opening's error.
        """
        return await self.send_call(step, timeout=timeout)

    def send_call(self, step: Message, *, timeout: float | None = None) -> Awaitable[Message]:
        """:meth:`call`, with ``step`` sent before this returns (no event-loop turn first);
        await the result for the reply. A client's first step goes out right behind its
        opening this way, before the servers that woke for the openings take the cores.

        Raises:
            StreamClosed: the session is closed (here, not when awaited).
            PeerUnavailable: the connection is closed (here, not when awaited).
        """
        if self._closed:
            raise StreamClosed("this streaming session is closed")
        if self._deferred_opening is not None:
            opening, opening_timeout = self._deferred_opening
            begun = self._connection._begin(opening, self.session, opening_timeout)
            self._deferred_opening = None
            self.opened = self._connection._await_opening(begun)
        reply = self._connection._finish(*self._connection._begin(step, self.session, timeout))
        opened = self.opened
        if opened is None or (opened.done() and not opened.cancelled() and opened.exception() is None):
            return reply
        return self._after_opening(reply, opened)

    @staticmethod
    async def _after_opening(reply: Awaitable[Message], opened: asyncio.Future) -> Message:
        # The opening is unanswered: its failure (refused, or no answer by its deadline) ends
        # this step at once rather than after the step's own, longer deadline.
        call = asyncio.ensure_future(reply)
        call.add_done_callback(_retrieve)
        try:
            await asyncio.wait({call, opened}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done() or call.exception() is not None:
                await asyncio.wait({opened})  # bounded by the opening's own deadline
                if not opened.cancelled() and opened.exception() is not None:
                    raise opened.exception()
            return await call
        finally:
            call.cancel()

    async def close(self) -> None:
        """End the session (the server's handler sees the end of its steps). Idempotent."""
        if not self._closed:
            self._closed = True
            if self.opened is not None and not self.opened.done():
                self.opened.cancel()
            if self._deferred_opening is not None:
                return  # never sent: the server knows nothing of this session
            try:
                self._connection._notify(StreamClose(), self.session)
            except SwarmError:
                pass  # the server expires the session after Timeouts.stream_idle anyway

    async def __aenter__(self) -> ClientStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _retrieve(future: asyncio.Future) -> None:
    """Marks a background future's exception as read (its owner reports it when it matters)."""
    if not future.cancelled():
        future.exception()


def _expire(future: asyncio.Future, address: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded(f"no reply from {address} within {timeout} s"))

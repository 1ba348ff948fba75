"""The serving half of an endpoint, independent of how frames move.

A ``Dispatcher`` takes each received message, checks it, and runs the handler
registered for its kind. Unary handlers run concurrently, one task per request.
Streaming sessions get one task each that sees its steps strictly in order (see
``transport.streams``). Every failure becomes an ``ErrorReply`` to that caller only;
nothing a peer sends can stop the dispatcher.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from transport.control import ErrorReply, Ping, Pong, StreamClose, error_reply
from transport.curve import admission_token
from transport.errors import (
    ConfigurationError,
    NotAuthorized,
    ServerBusy,
    StreamClosed,
    SwarmError,
    UnknownMessageKind,
)
from transport.limits import Limits, Timeouts
from transport.messages import (
    Message,
    MessageRegistry,
    PeerKey,
    decode_body,
    decode_envelope,
    encode_message,
    salvage_request_id,
)
from transport.streams import RequestContext, ServerStream

log = logging.getLogger(__name__)

SendFrames = Callable[[Any, list[Any]], None]
"""Sends frames to a route (the transport's handle for one client); never blocks."""


Handler = Callable[[Any, RequestContext], Awaitable[Message]]
StreamHandler = Callable[[ServerStream], Awaitable[None]]


async def _pong(request: Ping, context: RequestContext) -> Pong:
    return Pong()


class Dispatcher:
    """Routes received messages to handlers and sends their replies."""

    def __init__(
        self,
        send: SendFrames,
        registry: MessageRegistry,
        limits: Limits,
        timeouts: Timeouts,
        swarm_key: bytes | None,
    ):
        self._send = send
        self._registry = registry
        self._limits = limits
        self._timeouts = timeouts
        self._swarm_key = swarm_key
        self._admitted: dict[bytes, bytes] = {}
        self._handlers: dict[str, tuple[type[Message], Handler]] = {}
        self._stream_handlers: dict[str, tuple[type[Message], StreamHandler]] = {}
        self._sessions: dict[tuple[Any, bytes], ServerStream] = {}
        self._sessions_of: dict[Any, int] = {}  # peer -> open streaming sessions
        self._inflight_bytes: dict[Any, int] = {}  # peer -> bytes of its unary requests in hand
        self._tasks: set[asyncio.Task] = set()
        self._suspended: dict[asyncio.Future, Coroutine[Any, Any, None]] = {}
        self._closed = False
        self.add_handler(Ping, _pong)

    def add_handler(self, kind: type[Message], handler: Handler) -> None:
        """Serve requests of ``kind`` with ``await handler(request, context) -> reply``.

        Raises:
            ConfigurationError: ``kind`` already has a handler.
        """
        self._check_new(kind)
        self._handlers[kind.kind] = (kind, handler)

    def add_stream_handler(self, kind: type[Message], handler: StreamHandler) -> None:
        """Serve streaming sessions opened by ``kind`` with ``await handler(stream)``.

        Raises:
            ConfigurationError: ``kind`` already has a handler.
        """
        self._check_new(kind)
        self._stream_handlers[kind.kind] = (kind, handler)

    def _check_new(self, kind: type[Message]) -> None:
        if not (isinstance(kind, type) and issubclass(kind, Message) and hasattr(kind, "_wire_fields")):
            raise ConfigurationError(f"{kind!r} is not a message class declared with @message")
        if kind.kind in self._handlers or kind.kind in self._stream_handlers:
            raise ConfigurationError(f"message kind {kind.kind!r} already has a handler")
        self._registry.register(kind)

    def reply(self, route: Any, request_id: int, msg: Message, session: bytes | None = None) -> None:
        """Send ``msg`` as the reply to ``request_id`` (nothing for id 0)."""
        if request_id == 0 or self._closed:
            return
        try:
            frames = encode_message(msg, request_id, session)
        except SwarmError as error:  # the handler built a bad reply: report that instead
            frames = encode_message(error_reply(error), request_id, session)
        self._send(route, frames)

    def reply_error(self, route: Any, request_id: int, error: BaseException) -> None:
        """Send ``error`` to the caller (also for id 0: the sender learns what went wrong)."""
        if not self._closed:
            self._send(route, encode_message(error_reply(error), request_id))

    def receive(self, frames: list[Any], route: Any, peer_key: PeerKey | None) -> None:
        """Handle one received message; never raises.

        Args:
            frames: the message's frames, envelope first (bytes-like).
            route: the transport's handle to reply to the sender.
            peer_key: the sender's authenticated CURVE key, if any.
        """
        request_id = 0
        try:
            envelope = decode_envelope(frames, self._limits)
            request_id = envelope.request_id
            if self._swarm_key is not None:
                self._check_admission(peer_key, envelope.token)
            if envelope.session is not None:
                self._receive_step(envelope, frames, route, peer_key)
                return
            entry = self._handlers.get(envelope.kind)
            if entry is None:
                raise UnknownMessageKind(f"no handler for message kind {envelope.kind!r}")
            request = decode_body(entry[0], envelope, frames, self._limits)
            pending = len(self._tasks) + len(self._suspended)
            if pending >= self._limits.max_pending_requests:
                raise ServerBusy(f"{pending} requests pending")
            owner = peer_key if peer_key is not None else route
            size = self._hold_bytes(owner, frames)
            context = RequestContext(peer_key)
            self._start_eagerly(self._run_handler(entry[1], request, context, route, request_id, owner, size))
        except SwarmError as error:
            if not request_id and frames:
                request_id = salvage_request_id(frames[0])
            self.reply_error(route, request_id, error)
        except Exception as error:  # a bug of ours: report it, keep serving
            log.exception("dispatcher failed on a message from %r", peer_key)
            self.reply_error(route, request_id, error)

    def _hold_bytes(self, owner: Any, frames: list[Any]) -> int:
        """Counts a received message against its sender's in-flight bytes; returns its size.

        Raises:
            ServerBusy: the sender's requests in hand would exceed ``max_inflight_bytes_per_peer``.
        """
        size = sum(memoryview(frame).nbytes for frame in frames)
        held = self._inflight_bytes.get(owner, 0)
        if held + size > self._limits.max_inflight_bytes_per_peer:
            raise ServerBusy(f"{held} bytes of this peer's requests are still being handled")
        self._inflight_bytes[owner] = held + size
        return size

    def _release(self, owner: Any, size: int) -> None:
        left = self._inflight_bytes.pop(owner, 0) - size
        if left > 0:
            self._inflight_bytes[owner] = left

    def release_bytes(self, owner: Any, size: int) -> None:
        """A queued stream step of ``size`` bytes from ``owner`` was taken (or dropped)."""
        self._release(owner, size)

    def _check_admission(self, peer_key: PeerKey | None, token: bytes | None) -> None:
        if peer_key is None or token is None:
            raise NotAuthorized("this swarm is private: connect with its swarm_key")
        expected = self._admitted.get(peer_key)
        if expected is None:
            if len(self._admitted) >= 65536:  # bound the cache against key-churning clients
                self._admitted.clear()
            expected = self._admitted[peer_key] = admission_token(self._swarm_key, peer_key)  # type: ignore[arg-type]
        if not hmac.compare_digest(token, expected):
            raise NotAuthorized("wrong swarm_key for this private swarm")

    def _start_eagerly(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` now, up to its first suspension; a task takes over from there.

        Most handlers answer without suspending; running them in place saves a task and
        an event loop iteration per request (what ``eager_start=True`` does on 3.12+).
        """
        try:
            awaited = coroutine.send(None)
        except StopIteration:
            return
        if awaited is None or not asyncio.isfuture(awaited):  # a bare yield: resume next iteration
            self._start(coroutine)
            return
        awaited._asyncio_future_blocking = False  # the task's bookkeeping, done by hand
        self._suspended[awaited] = coroutine

        def resume(_: object) -> None:
            # a task's first step resumes the coroutine after the future it awaits
            if self._suspended.pop(awaited, None) is not None:
                self._start(coroutine)

        awaited.add_done_callback(resume)

    def _start(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(
        self,
        handler: Handler,
        request: Message,
        context: RequestContext,
        route: Any,
        request_id: int,
        owner: Any = None,
        size: int = 0,
    ) -> None:
        try:
            result = await handler(request, context)
        except Exception as error:
            if not isinstance(error, SwarmError):
                log.exception("handler for %s from %r failed", request.kind, context.peer_key)
            self.reply(route, request_id, error_reply(error))
            return
        finally:
            self._release(owner, size)
        if not isinstance(result, Message):
            result = ErrorReply("TypeError", f"handler for {request.kind} returned {type(result).__name__}")
        self.reply(route, request_id, result)

    def _receive_step(self, envelope: Any, frames: list[Any], route: Any, peer_key: PeerKey | None) -> None:
        key = (peer_key if peer_key is not None else route, envelope.session)
        stream = self._sessions.get(key)
        if envelope.kind == StreamClose.kind:
            if stream is not None:
                stream.end()
            return
        if stream is None:
            entry = self._stream_handlers.get(envelope.kind)
            if entry is None:
                raise StreamClosed("no such streaming session (closed, expired, or never opened)")
            if len(self._sessions) >= self._limits.max_sessions:
                raise ServerBusy(f"{len(self._sessions)} streaming sessions open")
            if self._sessions_of.get(key[0], 0) >= self._limits.max_sessions_per_peer:
                raise ServerBusy(
                    f"this peer holds {self._sessions_of[key[0]]} streaming sessions, the most one may"
                )
            opening = decode_body(entry[0], envelope, frames, self._limits)
            context = RequestContext(peer_key, envelope.session)
            stream = ServerStream(self, opening, context, route, envelope.request_id, self._timeouts)
            self._sessions[key] = stream
            self._sessions_of[key[0]] = self._sessions_of.get(key[0], 0) + 1
            self._start(self._run_stream(entry[1], stream, key))
            return
        step = decode_body(self._registry.lookup(envelope.kind), envelope, frames, self._limits)
        size = self._hold_bytes(key[0], frames)
        try:
            stream.push(envelope.request_id, step, route, self._limits.max_stream_backlog, size)
        except BaseException:
            self._release(key[0], size)
            raise

    async def _run_stream(self, handler: StreamHandler, stream: ServerStream, key: tuple) -> None:
        error: BaseException | None = None
        try:
            await handler(stream)
        except asyncio.CancelledError:
            error = StreamClosed("the server is closing")
            raise
        except Exception as failure:
            if not isinstance(failure, SwarmError):
                log.exception("stream handler for %s from %r failed", stream.opening.kind, key[0])
            error = failure
        finally:
            if self._sessions.get(key) is stream:
                del self._sessions[key]
            left = self._sessions_of.pop(key[0], 0) - 1
            if left > 0:
                self._sessions_of[key[0]] = left
            stream.finish(error)

    async def close(self) -> None:
        """Stop serving: cancel every handler and session, and wait for them."""
        self._closed = True
        suspended, self._suspended = self._suspended, {}
        for coroutine in suspended.values():
            # cancelled below before its first step, so the coroutine gets CancelledError
            # where it awaits (resume callbacks find the map empty and do nothing)
            self._start(coroutine)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

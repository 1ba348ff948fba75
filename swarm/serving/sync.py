"""A blocking facade over ``RemoteModel`` for scripts and notebooks (the async API stays primary)::

    from swarm.serving import connect_sync

    with connect_sync("model.gguf", initial_peers=[maddr]) as model:
        print(model.generate("Once upon a time", 32))
        for piece in model.stream_chat([{"role": "user", "content": "Hi!"}]):
            print(piece, end="", flush=True)

The model's event loop runs in a background thread owned by the facade, so this works
where a loop already runs in the calling thread (Jupyter) too. Leaving a ``stream``
loop early closes its inference session.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from swarm.serving.remote_model import RemoteModel

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread; ``run`` blocks on one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


class SyncRemoteModel:
    """``RemoteModel``'s methods, blocking. Create with :func:`connect_sync`; close with :meth:`close`.

    Attributes:
        model: the underlying ``RemoteModel`` (its attributes: ``model_config``, ``tokenizer``, ...).
    """

    def __init__(self, model: RemoteModel, loop: _LoopThread):
        self.model, self._loop = model, loop

    def generate(self, prompt, max_new_tokens: int = 32, **options):
        """See ``RemoteModel.generate``."""
        return self._loop.run(self.model.generate(prompt, max_new_tokens, **options))

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, **options) -> str:
        """See ``RemoteModel.chat``."""
        return self._loop.run(self.model.chat(messages, max_new_tokens, **options))

    def stream(self, prompt, max_new_tokens: int = 32, **options) -> Iterator:
        """See ``RemoteModel.stream``."""
        return self._iterate(self.model.stream(prompt, max_new_tokens, **options))

    def stream_chat(self, messages: Sequence[dict], max_new_tokens: int = 256, **options) -> Iterator[str]:
        """See ``RemoteModel.stream_chat``."""
        return self._iterate(self.model.stream_chat(messages, max_new_tokens, **options))

    def _iterate(self, stream) -> Iterator:
        try:
            while True:
                try:
                    yield self._loop.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:  # also when the caller stops early: end the session on the servers
            self._loop.run(stream.aclose())

    def close(self) -> None:
        """Leaves the swarm and stops the background loop. Idempotent."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            loop.run(self.model.close())
        finally:
            loop.stop()

    def __enter__(self) -> SyncRemoteModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _connected(checkpoint, initial_peers, options) -> RemoteModel:
    return await RemoteModel.connect(checkpoint, initial_peers, **options)


def connect_sync(checkpoint: str | Path, initial_peers: Sequence[str], **options) -> SyncRemoteModel:
    """``RemoteModel.connect`` for blocking code; same arguments. Use as a context manager."""
    loop = _LoopThread()
    try:
        model = loop.run(_connected(checkpoint, initial_peers, options))
    except BaseException:
        loop.stop()
        raise
    return SyncRemoteModel(model, loop)

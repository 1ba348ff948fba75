"""The serving daemon's edges, with `swarm join` processes on 127.0.0.1: malformed and
out-of-range requests get a clear error and the server goes on serving; a session over
``--cache-tokens`` is refused with ServerBusy and the client routes elsewhere; idle
sessions expire and free their cache; concurrent sessions' steps share one forward and
give the outputs they give alone (also checked in-process, deterministically)."""

from __future__ import annotations

import asyncio
import secrets
import threading

import pytest
import torch

from kernels import load_blocks
from kernels.tiny import write_tiny_checkpoint
from swarm.serving import RemoteModel
from swarm.serving.batching import StepBatcher
from swarm.serving.protocol import (
    ForwardRequest,
    InferenceStep,
    OpenInference,
    PushHidden,
    ServerStats,
    StatsRequest,
)
from tests.harness import ServingSwarm, wait_until
from transport.errors import RemoteError

HIDDEN = 64
SMALL_CACHE = 16  # x's budget: a session of 8 tokens fits, one of 18 does not
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("server-edges")
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=HIDDEN)
    with ServingSwarm(tmp_path, checkpoint) as swarm:
        swarm.join("a", "0:2")
        swarm.join("b", "2:4")
        # One hop over every block is the cheapest route, so clients try x first.
        swarm.join("x", "0:4", "--cache-tokens", str(SMALL_CACHE), "--session-idle-timeout", "1")
        swarm.wait_online("a", "b", "x")
        yield swarm


async def _connect(swarm, *also: str) -> RemoteModel:
    """A client that already lists a, b and x (and the servers named in ``also``)."""
    return await swarm.connect(listing=("a", "b", "x", *also))


async def _connection(model: RemoteModel, swarm, name: str):
    servers = await model.list_servers()
    return await model.connection_to(servers[swarm.peer_ids[name]])


async def _stats(model: RemoteModel, swarm, name: str) -> ServerStats:
    return await (await _connection(model, swarm, name)).call(StatsRequest(), timeout=10)


async def _expect_error(call, kind: str, match: str) -> RemoteError:
    with pytest.raises(RemoteError, match=match) as caught:
        await call
    assert caught.value.kind == kind
    return caught.value


def _local_blocks(swarm):
    return load_blocks(swarm.checkpoint, 0, 4, torch.float32, "cpu").eval()


@pytest.mark.slow
def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(swarm):
    async def scenario():
        async with await _connect(swarm) as model:
            a = await _connection(model, swarm, "a")
            good = torch.randn(1, 3, HIDDEN)
            # Blocks outside a's span 0:2, for a forward and for a session.
            await _expect_error(a.call(ForwardRequest(0, 3, good), timeout=10), "MalformedMessage", "span")
            await _expect_error(
                a.open_stream(OpenInference(secrets.token_bytes(16), 2, 4, 1, 8), timeout=10),
                "MalformedMessage", "span",
            )  # fmt: skip
            # A session longer than the model's maximum length.
            await _expect_error(
                a.open_stream(OpenInference(secrets.token_bytes(16), 0, 2, 1, 10**6), timeout=10),
                "MalformedMessage", "max_length",
            )  # fmt: skip
            # Wrong hidden size, in a forward and in a step.
            wrong = torch.randn(1, 3, HIDDEN - 1)
            await _expect_error(a.call(ForwardRequest(0, 2, wrong), timeout=10), "MalformedMessage", "hidden")
            token = secrets.token_bytes(16)
            stream = await a.open_stream(OpenInference(token, 0, 2, 1, 8), timeout=10)
            await _expect_error(
                stream.call(InferenceStep(0, 0, 3, wrong), timeout=10), "MalformedMessage", "hidden"
            )
            await stream.close()
            # Positions beyond the session's max_length, and beyond what it holds.
            stream = await a.open_stream(OpenInference(secrets.token_bytes(16), 0, 2, 1, 8), timeout=10)
            await stream.call(InferenceStep(0, 0, 3, good), timeout=10)
            await _expect_error(
                stream.call(InferenceStep(1, 3, 6, torch.randn(1, 6, HIDDEN)), timeout=10),
                "MalformedMessage", "max_length",
            )  # fmt: skip
            await stream.close()
            stream = await a.open_stream(OpenInference(secrets.token_bytes(16), 0, 2, 1, 8), timeout=10)
            await _expect_error(
                stream.call(InferenceStep(0, 5, 1, torch.randn(1, 1, HIDDEN)), timeout=10),
                "MalformedMessage", "outside",
            )  # fmt: skip
            await stream.close()
            # Another client's session: its token can be neither reused nor pushed into by guessing.
            owner = await a.open_stream(OpenInference(token, 0, 2, 1, 8), timeout=10)
            async with await _connect(swarm) as intruder:
                a2 = await _connection(intruder, swarm, "a")
                await _expect_error(
                    a2.open_stream(OpenInference(token, 0, 2, 1, 8), timeout=10), "MalformedMessage", "in use"
                )
                await _expect_error(
                    a2.call(PushHidden(secrets.token_bytes(16), 0, good), timeout=10),
                    "MalformedMessage", "no such session",
                )  # fmt: skip
            # The owner's session and a fresh client's generation still work.
            reply = await owner.call(InferenceStep(0, 0, 3, good), timeout=10)
            await owner.close()
            with torch.inference_mode():
                expected = load_blocks(swarm.checkpoint, 0, 2, torch.float32, "cpu").eval()(good)
            torch.testing.assert_close(reply.hidden, expected)
            async with model.inference_session(8) as session:
                output = await session.step(good)
            with torch.inference_mode():
                torch.testing.assert_close(output, _local_blocks(swarm)(good))

    asyncio.run(scenario())


@pytest.mark.slow
def test_session_over_cache_budget_is_refused_and_routed_elsewhere(swarm):
    async def scenario():
        async with await _connect(swarm) as model:
            x = await _connection(model, swarm, "x")
            error = await _expect_error(
                x.open_stream(OpenInference(secrets.token_bytes(16), 0, 4, 1, SMALL_CACHE + 1), timeout=10),
                "ServerBusy", "cache budget",
            )  # fmt: skip
            assert error.retryable
            hidden = torch.randn(1, SMALL_CACHE + 2, HIDDEN)
            async with model.inference_session(SMALL_CACHE + 2) as session:
                output = await session.step(hidden)  # the first step learns of a refused opening
                route = [swarm.name_of(peer) for peer, _ in session.route]
            assert swarm.peer_ids["x"] in model.bans.banned()
            return route, output, hidden

    route, output, hidden = asyncio.run(scenario())
    assert route == ["a", "b"]
    with torch.inference_mode():
        torch.testing.assert_close(output, _local_blocks(swarm)(hidden))


@pytest.mark.slow
def test_idle_session_expires_and_frees_its_cache(swarm):
    async def scenario():
        async with await _connect(swarm) as model:
            x = await _connection(model, swarm, "x")
            stream = await x.open_stream(OpenInference(secrets.token_bytes(16), 0, 4, 1, 8), timeout=10)
            await stream.call(InferenceStep(0, 0, 2, torch.randn(1, 2, HIDDEN)), timeout=10)
            busy = await _stats(model, swarm, "x")
            idle = await wait_until(  # x expires sessions after 1 s without a step
                lambda: _stats(model, swarm, "x"),
                until=lambda stats: stats.sessions == 0,
                timeout=30,
                what="x to expire the idle session",
            )
            return busy, idle

    busy, idle = asyncio.run(scenario())
    assert (busy.sessions, busy.cache_tokens_used) == (1, 8)
    assert (idle.sessions, idle.cache_tokens_used) == (0, 0)


@pytest.mark.slow
def test_expired_session_is_reopened_on_the_same_server_without_a_ban(swarm):
    """A session that expired while its client was busy elsewhere is not the server's fault."""
    torch.manual_seed(1)
    first, second = torch.randn(1, 3, HIDDEN), torch.randn(1, 2, HIDDEN)

    async def scenario():
        # 8 tokens fit x's per-client share, and one hop over every block is the cheapest route.
        async with await _connect(swarm) as model, model.inference_session(8) as session:
            route = [swarm.name_of(peer) for peer, _ in session.route]
            out_first = await session.step(first)
            await wait_until(  # x expires sessions after 1 s without a step
                lambda: _stats(model, swarm, "x"),
                until=lambda stats: stats.sessions == 0,
                timeout=30,
                what="x to expire the idle session",
            )
            out_second = await session.step(second)
            return route, out_first, out_second, session.failovers, session.route, model.bans.banned()

    route, out_first, out_second, failovers, after, banned = asyncio.run(scenario())
    assert route == ["x"] and failovers == 1
    assert [peer for peer, _ in after] == [swarm.peer_ids["x"]]  # reopened and replayed on x
    assert swarm.peer_ids["x"] not in banned
    blocks = _local_blocks(swarm)
    cache = blocks.allocate_cache(1, 8)
    with torch.inference_mode():
        torch.testing.assert_close(out_first, blocks(first, cache), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_second, blocks(second, cache), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_concurrent_sessions_share_forwards_with_unchanged_outputs(swarm):
    lengths = [3, 5, 2, 4, 6, 1, 3, 2]  # different prefixes: the batch mixes cache lengths
    steps = 6
    torch.manual_seed(0)
    inputs = [
        [torch.randn(1, n, HIDDEN)] + [torch.randn(1, 1, HIDDEN) for _ in range(steps)] for n in lengths
    ]

    async def run_session(model: RemoteModel, chunks):
        async with model.inference_session(SMALL_CACHE + 2) as session:  # too big for x: a -> b
            return [await session.step(chunk) for chunk in chunks]

    async def scenario():
        async with await _connect(swarm) as model:
            before = await _stats(model, swarm, "a")
            outputs = await asyncio.gather(*(run_session(model, chunks) for chunks in inputs))
            after = await _stats(model, swarm, "a")
            return outputs, before, after

    outputs, before, after = asyncio.run(scenario())
    assert after.batched_steps > before.batched_steps
    assert after.forwards - before.forwards < len(lengths) * (steps + 1)
    blocks = _local_blocks(swarm)
    for chunks, got in zip(inputs, outputs, strict=True):
        cache = blocks.allocate_cache(1, SMALL_CACHE + 2)
        with torch.inference_mode():
            for chunk, output in zip(chunks, got, strict=True):
                torch.testing.assert_close(output, blocks(chunk, cache), rtol=1e-5, atol=1e-5)


def test_batched_steps_equal_steps_alone(tmp_path):
    """In-process: steps queued together run as one forward and match running alone."""
    write_tiny_checkpoint(tmp_path, num_layers=2, hidden_size=HIDDEN)
    blocks = load_blocks(tmp_path, 0, 2, torch.float32, "cpu").eval()
    torch.manual_seed(0)
    prefixes = [torch.randn(2, 4, HIDDEN), torch.randn(1, 7, HIDDEN), torch.randn(3, 1, HIDDEN)]
    steps = [torch.randn(p.shape[0], 1, HIDDEN) for p in prefixes]

    async def scenario(together: bool):
        batcher = StepBatcher(blocks, max_rows=64)
        runner = asyncio.create_task(batcher.run())
        caches = [blocks.allocate_cache(p.shape[0], 12) for p in prefixes]
        for cache, prefix in zip(caches, prefixes, strict=True):
            await batcher.step(cache, prefix, 0)
        if together:
            outputs = await asyncio.gather(
                *(batcher.step(c, s, p.shape[1]) for c, s, p in zip(caches, steps, prefixes, strict=True))
            )
        else:
            outputs = [
                await batcher.step(c, s, p.shape[1]) for c, s, p in zip(caches, steps, prefixes, strict=True)
            ]
        runner.cancel()
        return outputs, batcher

    alone, single = asyncio.run(scenario(False))
    together, batched = asyncio.run(scenario(True))
    assert single.batched_steps == 0
    assert batched.batched_steps == len(prefixes)
    assert batched.forwards == len(prefixes) + 1
    for mine, theirs in zip(together, alone, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_short_forwards_run_on_the_event_loop_and_long_ones_in_a_thread(tmp_path):
    """In-process: a forward no bigger than one that ran under ``inline_seconds`` runs on the
    event loop's thread (no hand-offs); the first of its size, a bigger one, or any with
    ``inline_seconds=0`` runs in a worker thread; the outputs are the same either way."""
    write_tiny_checkpoint(tmp_path, num_layers=2, hidden_size=HIDDEN)
    blocks = load_blocks(tmp_path, 0, 2, torch.float32, "cpu").eval()
    torch.manual_seed(0)
    prompt, token, longer = torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN), torch.randn(1, 6, HIDDEN)

    class Recording(StepBatcher):
        def _forward(self, group):
            threads.append(threading.get_ident())
            return super()._forward(group)

    async def scenario(inline_seconds: float):
        batcher = Recording(blocks, inline_seconds=inline_seconds)
        runner = asyncio.create_task(batcher.run())
        cache = blocks.allocate_cache(1, 16)
        outputs = [await batcher.step(cache, prompt, 0), await batcher.step(cache, token, 4),
                   await batcher.step(cache, prompt, 0), await batcher.step(cache, longer, 4)]  # fmt: skip
        runner.cancel()
        return outputs, threading.get_ident()

    threads: list[int] = []
    inline, loop_thread = asyncio.run(scenario(inline_seconds=60.0))
    # 4 positions: first of its size (thread); 1: no more than 4 (loop); 4 again (loop); 6 (thread)
    assert [thread == loop_thread for thread in threads] == [False, True, True, False]
    threads.clear()
    threaded, loop_thread = asyncio.run(scenario(inline_seconds=0.0))
    assert loop_thread not in threads
    for mine, theirs in zip(inline, threaded, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_steps_result_is_delivered_before_other_callbacks_and_its_error_is_the_steps(tmp_path):
    """In-process: ``on_result`` gets the output right after the forward, before anything the
    event loop took meanwhile (a message that arrived during the forward) and before the step's
    awaiter resumes; what it raises is the step's error, and the batcher keeps serving."""
    write_tiny_checkpoint(tmp_path, num_layers=2, hidden_size=HIDDEN)
    blocks = load_blocks(tmp_path, 0, 2, torch.float32, "cpu").eval()
    torch.manual_seed(0)
    prompt, token = torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN)
    events: list[str] = []
    delivered: list[torch.Tensor] = []
    loop = None

    class ArrivingDuringForward(StepBatcher):
        def _forward(self, group):
            loop.call_soon_threadsafe(events.append, "other message")  # (the first runs in a thread)
            return super()._forward(group)

    def deliver(output: torch.Tensor) -> None:
        events.append("sent")
        delivered.append(output)

    def refuse(output: torch.Tensor) -> None:
        raise ValueError("refused")

    async def scenario():
        nonlocal loop
        loop = asyncio.get_running_loop()
        batcher = ArrivingDuringForward(blocks, inline_seconds=60.0)
        runner = asyncio.create_task(batcher.run())
        cache = blocks.allocate_cache(1, 16)
        await batcher.step(cache, prompt, 0)  # the first of its size runs in a thread
        events.clear()
        output = await batcher.step(cache, token, 4, on_result=deliver)  # inline
        events.append("resumed")
        with pytest.raises(ValueError, match="refused"):
            await batcher.step(cache, token, 5, on_result=refuse)
        after = await batcher.step(cache, token, 6)
        runner.cancel()
        return output, after

    output, after = asyncio.run(scenario())
    assert events[:3] == ["sent", "other message", "resumed"]
    assert delivered[0] is output
    assert after.shape == (1, 1, HIDDEN)


@pytest.mark.slow
def test_replacement_dying_during_replay_is_replaced_again(swarm):
    """Runs last: p and d die here by design (their records outlive them)."""
    # p (one hop over every block, announced as fastest) dies at its 5th step; the
    # fastest replacement a -> d loses d at its 3rd replayed step; a -> b must finish.
    swarm.join("p", "0:4", "--throughput", "1e6", "--fail-at-step", "5")
    swarm.join("d", "2:4", "--throughput", "1e6", "--fail-at-step", "3")
    swarm.wait_online("p", "d")
    torch.manual_seed(1)
    chunks = [torch.randn(1, 6, HIDDEN)] + [torch.randn(1, 1, HIDDEN) for _ in range(6)]

    async def scenario():
        model = await _connect(swarm, "p", "d")
        async with model, model.inference_session(SMALL_CACHE + 2) as session:  # too big for x
            first = [swarm.name_of(peer) for peer, _ in session.route]
            outputs = [await session.step(chunk) for chunk in chunks]
            last = [swarm.name_of(peer) for peer, _ in session.route]
            return first, last, outputs, session.failovers, session.replay_failures

    first, last, outputs, failovers, replay_failures = asyncio.run(scenario())
    assert first == ["p"] and last == ["a", "b"]
    assert (failovers, replay_failures) == (1, 1)
    assert swarm.servers["p"].process.wait(timeout=30) != 0
    assert swarm.servers["d"].process.wait(timeout=30) != 0
    blocks = _local_blocks(swarm)
    cache = blocks.allocate_cache(1, SMALL_CACHE + 2)
    with torch.inference_mode():
        for chunk, output in zip(chunks, outputs, strict=True):
            torch.testing.assert_close(output, blocks(chunk, cache))

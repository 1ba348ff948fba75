"""A server under abuse (issue #19), with a real `swarm join` process on 127.0.0.1.

- Connection floods: the daemon raises its soft descriptor limit (started at 1,024) to
  the hard one; with the hard limit then cut to 1,024 too, thousands of idle TCP
  connections to its data-plane port exhaust its descriptors, and it neither exits
  nor stops serving the client already connected, keeps announcing, and serves new
  clients once the flood is gone.
- Quotas: a greedy client is refused (``ServerBusy``) at its session count and at its
  share of the cache budget, and another client still generates; a list of prompts
  that no server can take fails with ``NoRouteError``, not an ``ExceptionGroup``.
- The push mailbox of a session holds a bounded number of inputs; a message of the
  wrong kind inside a session gets a typed error and the session goes on.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import secrets
import socket
import subprocess

import pytest
import torch

from kernels import generate, load_local_model
from kernels.tiny import write_tiny_checkpoint
from swarm import NoRouteError
from swarm.records import block_key
from swarm.serving.protocol import InferenceStep, OpenInference, PushHidden, StatsRequest
from tests.harness import NEW_TOKENS, PROMPT, ServingSwarm, wait_until
from transport.errors import RemoteError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HIDDEN = 64
CACHE_TOKENS = 1024  # a client's share: 512
SESSIONS_PER_CLIENT = 40
FLOOD = 3000


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("abuse")
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=HIDDEN)
    with ServingSwarm(tmp_path, checkpoint) as swarm:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # the child inherits it
        try:
            swarm.join("x", "0:4", "--cache-tokens", str(CACHE_TOKENS), "--throughput", "100",
                       "--max-sessions-per-client", str(SESSIONS_PER_CLIENT))  # fmt: skip
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        swarm.wait_online("x")
        yield swarm


@pytest.fixture(scope="module")
def expected(swarm):
    return generate(load_local_model(swarm.checkpoint), PROMPT, NEW_TOKENS)


def _open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def _flood(port: int, count: int) -> list[socket.socket]:
    """``count`` idle TCP connections to ``port`` (non-blocking: a full backlog does not stall us)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            continue
        sockets.append(sock)
    return sockets


async def _record_expiration(swarm, peer_id: str) -> float:
    listing = await swarm.bootstrap.list(block_key("swarm", 0), timeout=10)
    return listing[peer_id].expiration_time if peer_id in listing else 0.0


def test_connection_flood_at_the_descriptor_limit_does_not_stop_the_server(swarm, expected):
    server = swarm.servers["x"]
    pid = server.process.pid
    soft, hard = _open_files_limit(pid)
    assert soft == hard and soft > 1024, (soft, hard)  # raised from the inherited 1,024
    # Now hold it to 1,024 for good, so the flood below exhausts the server's descriptors.
    subprocess.run(["prlimit", "--pid", str(pid), "--nofile=1024:1024"], check=True)
    assert _open_files_limit(pid) == (1024, 1024)
    port = int(server.wait_for_line("ONLINE", 10).split(" at ")[1].split()[0].rsplit(":", 1)[1])
    peer_id = swarm.peer_ids["x"]

    async def scenario():
        async with await swarm.connect(listing=("x",)) as model:
            assert torch.equal(await model.generate(PROMPT, NEW_TOKENS), expected)  # connected before
            sockets = await asyncio.to_thread(_flood, port, FLOOD)
            try:
                await wait_until(  # the flood takes (nearly) every descriptor the server has
                    lambda: len(os.listdir(f"/proc/{pid}/fd")),
                    until=lambda count: count >= 1000,
                    timeout=30,
                    what="the server's descriptors to run out",
                )
                flooded_at = await _record_expiration(swarm, peer_id)
                # The connected client is served while the descriptors are exhausted.
                during = await model.generate(PROMPT, NEW_TOKENS)
                # The announcer goes on (record refreshed every 2 s).
                try:
                    await wait_until(
                        lambda: _record_expiration(swarm, peer_id),
                        until=lambda expiration: expiration > flooded_at,
                        timeout=30,
                        what="x to re-announce during the flood",
                    )
                except AssertionError as error:  # seen once in a full run: keep x's side of it
                    raise AssertionError(f"{error}\nx's last lines:\n{server.tail(40)}") from None
            finally:
                for sock in sockets:
                    sock.close()
        assert server.process.poll() is None, "the server exited under the flood"
        async with await swarm.connect(listing=("x",)) as fresh:
            after = await fresh.generate(PROMPT, NEW_TOKENS)
        return len(sockets), during, after

    flooded, during, after = asyncio.run(scenario())
    assert flooded > 2 * 1024
    assert torch.equal(during, expected) and torch.equal(after, expected)
    assert server.process.poll() is None
    assert not any("stopped by an error" in line for line in server.lines)


def test_greedy_client_cannot_starve_another(swarm, expected):
    async def open_until_refused(connection, max_length: int, held: list) -> RemoteError:
        while True:
            try:
                opening = OpenInference(secrets.token_bytes(16), 0, 4, 1, max_length)
                stream = await connection.open_stream(opening, timeout=10)
                await stream.call(InferenceStep(0, 0, 1, torch.randn(1, 1, HIDDEN)), timeout=10)
            except RemoteError as error:
                return error
            held.append(stream)

    async def scenario():
        async with (
            await swarm.connect(listing=("x",)) as greedy,
            await swarm.connect(listing=("x",)) as polite,
        ):
            x = (await greedy.list_servers())[swarm.peer_ids["x"]]
            connection = await greedy.connection_to(x)
            held: list = []
            too_many = await open_until_refused(connection, 4, held)
            sessions_held = len(held)
            for stream in held[:10]:
                await stream.close()
            held = held[10:]  # 30 sessions of 4 tokens: 120 of the 512 a client may hold
            # A close is one way and the server releases a session when its handler ends
            # (a later event-loop turn): opening at once could still find 40 held.
            await wait_until(
                lambda: connection.call(StatsRequest(), timeout=10),
                what="the server to release the 10 closed sessions",
                until=lambda stats: stats.sessions == len(held),
            )
            too_big = await open_until_refused(connection, 64, held)  # 6 fit: 504 tokens
            output = await polite.generate(PROMPT, NEW_TOKENS)
            with pytest.raises(NoRouteError):  # each row needs more than a client's share
                await polite.generate([PROMPT, PROMPT], 520)
            for stream in held:
                await stream.close()
            return sessions_held, too_many, len(held), too_big, output

    sessions_held, too_many, held, too_big, output = asyncio.run(scenario())
    assert sessions_held == SESSIONS_PER_CLIENT
    assert too_many.kind == "ServerBusy" and too_many.retryable and "sessions" in too_many.message
    assert held == 30 + 6
    assert too_big.kind == "ServerBusy" and too_big.retryable and "share" in too_big.message
    assert torch.equal(output, expected)


def test_mailbox_is_bounded_and_a_wrong_kind_in_a_session_gets_a_typed_error(swarm):
    async def scenario():
        async with await swarm.connect(listing=("x",)) as model:
            x = (await model.list_servers())[swarm.peer_ids["x"]]
            connection = await model.connection_to(x)
            token = secrets.token_bytes(16)
            stream = await connection.open_stream(OpenInference(token, 0, 4, 1, 8), timeout=10)
            first = await stream.call(InferenceStep(0, 0, 2, torch.randn(1, 2, HIDDEN)), timeout=10)
            accepted = 0
            for step in range(1, 41):
                ack = await connection.call(PushHidden(token, step, torch.randn(1, 1, HIDDEN)), timeout=10)
                accepted += ack.accepted
            with pytest.raises(RemoteError) as wrong:
                await stream.call(PushHidden(token, 1, torch.randn(1, 1, HIDDEN)), timeout=10)
            after = await stream.call(InferenceStep(1, 2, 1, torch.randn(1, 1, HIDDEN)), timeout=10)
            await stream.close()
            return first, accepted, wrong.value, after

    first, accepted, wrong, after = asyncio.run(scenario())
    assert first.hidden.shape == (1, 2, HIDDEN)
    assert 1 <= accepted <= 4  # --mailbox-steps (4, the step's own input included): the rest dropped
    assert wrong.kind == "MalformedMessage" and "serve.step" in wrong.message
    assert after.hidden.shape == (1, 1, HIDDEN)  # the session survived the wrong message

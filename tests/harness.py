"""What the tests share: bounded polling, loopback ports, swarms of real peer processes, records.

- ``wait_until`` / ``wait_until_sync``: poll an observation with backoff until it satisfies a
  condition, under a deadline; a timeout fails naming what was awaited and the last value seen.
- ``free_port``: a free TCP port on 127.0.0.1 (for programs that cannot bind port 0 themselves).
- ``ProcessSwarm``: a bootstrap DHT node on 127.0.0.1 plus `swarm ...` child processes;
  ``ServingSwarm`` adds `swarm join` servers of one checkpoint and a client for them.
- ``make_server``, ``make_trainer``, ``MODEL``, ``hostile_view``: records with defaults, for
  tests that feed parsed records to the code under test.

Production modules are imported inside functions (or from package roots), so moving a
module around in ``peers/`` or ``swarm/`` does not break every test file at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peers.processes import PeerProcess, ProcessGroup
from swarm import DHTConfig, Identity, ModelRecord, PeerId, ServerRecord, ServerState, Span, SwarmDHT

# ---------------------------------------------------------------- bounded polling

FIRST_DELAY = 0.02  # seconds before the second look: most waits in these tests end within a few
MAX_DELAY = 0.5  # the backoff's ceiling, so a condition met late is still seen within half a second


def _timed_out(what: str, timeout: float, last: Any) -> AssertionError:
    seen = repr(last)
    if len(seen) > 1000:
        seen = seen[:1000] + "..."
    return AssertionError(f"timed out after {timeout:g}s waiting for {what}; last observed: {seen}")


async def wait_until(
    observe: Callable[[], Any], *, what: str, timeout: float = 15.0, until: Callable[[Any], object] = bool
) -> Any:
    """Calls ``observe`` (sync or async) with backoff until ``until(value)`` holds; returns that value.

    Args:
        observe: returns the current observation, or an awaitable of it.
        what: names the awaited condition in the failure message.
        timeout: seconds before giving up.
        until: decides whether an observation is the awaited one (default: it is truthy).

    Raises:
        AssertionError: after ``timeout`` seconds, naming ``what`` and the last observation.
    """
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while True:
        value = observe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(min(delay, left))
        delay = min(2 * delay, MAX_DELAY)


def wait_until_sync(
    observe: Callable[[], Any], *, what: str, timeout: float = 15.0, until: Callable[[Any], object] = bool
) -> Any:
    """``wait_until`` for code outside an event loop: blocks the calling thread between looks."""
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while True:
        value = observe()
        if until(value):
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout, value)
        time.sleep(min(delay, left))
        delay = min(2 * delay, MAX_DELAY)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- swarms of real processes


class ProcessSwarm:
    """A bootstrap DHT node on 127.0.0.1 and the `swarm ...` child processes that join through it.

    A context manager: leaving it kills every child (and what they forked) and stops the node.
    """

    def __init__(self, tmp_path: Path, swarm_name: str = "swarm"):
        self.tmp_path = tmp_path
        self.bootstrap = SwarmDHT(
            Identity.generate(), DHTConfig(swarm_name=swarm_name, host_maddrs=("/ip4/127.0.0.1/tcp/0",))
        )
        self.bootstrap.start()
        self.peers = [str(maddr) for maddr in self.bootstrap.visible_maddrs()]  # for --initial-peers
        self.group = ProcessGroup(tmp_path)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> PeerProcess:
        """Starts ``python -m peers.cli *args``, logging to ``<tmp_path>/<name>.log``."""
        return self.group.start(name, args, env)

    def close(self) -> None:
        self.group.close()
        self.bootstrap.shutdown()

    def __enter__(self) -> ProcessSwarm:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


NEW_TOKENS = 12
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300]])


def client_config(**changes):
    """The serving tests' ClientConfig: short waits and deadlines, for servers on loopback
    (``changes`` override any field, these defaults included)."""
    from swarm.serving import ClientConfig

    defaults = {"route_wait": 3.0, "route_poll": 0.5, "step_timeout": 8.0, "open_timeout": 5.0}
    return ClientConfig(**{**defaults, **changes})


class ServingSwarm(ProcessSwarm):
    """`swarm join` servers of one checkpoint, by name, with their peer ids once online."""

    def __init__(self, tmp_path: Path, checkpoint: Path):
        super().__init__(tmp_path)
        self.checkpoint = checkpoint
        self.servers: dict[str, PeerProcess] = {}
        self.peer_ids: dict[str, str] = {}

    def join(self, name: str, blocks: str, *extra: str) -> PeerProcess:
        """Starts server ``name`` on ``blocks`` (e.g. ``"0:2"`` or ``"auto"``) with short announce periods."""
        self.servers[name] = self.start(name, [
            "join", "--model", str(self.checkpoint), "--blocks", blocks, "--initial-peers", *self.peers,
            "--throughput-cache", str(self.tmp_path / "throughput.json"), "--announce-period", "2",
            "--record-ttl", "30", "--push-wait", "5", "--torch-threads", "1", *extra,
        ])  # fmt: skip
        return self.servers[name]

    def wait_online(self, *names: str) -> list[str]:
        """Waits for each server's ONLINE line and records its peer id; returns the lines."""
        lines = []
        for name in names:
            line = self.servers[name].wait_for_line("ONLINE", timeout=120)
            self.peer_ids[name] = line.strip().rsplit(" ", 1)[1]
            lines.append(line)
        return lines

    def name_of(self, peer_id: str) -> str:
        return next(name for name, known in self.peer_ids.items() if known == peer_id)

    async def connect(self, *, listing: tuple[str, ...] = (), timeout: float = 30.0, **changes):
        """A RemoteModel client of this swarm (``client_config(**changes)``), returned once the
        DHT lists every server named in ``listing`` to it (within ``timeout`` seconds)."""
        from swarm.serving import RemoteModel

        model = await RemoteModel.connect(self.checkpoint, self.peers, config=client_config(**changes))
        if listing:
            try:
                await wait_until(
                    model.list_servers,
                    until=lambda servers: all(self.peer_ids[name] in servers for name in listing),
                    timeout=timeout,
                    what=f"the client to list servers {', '.join(listing)}",
                )
            except BaseException:
                await model.close()
                raise
        return model


# ---------------------------------------------------------------- records


@contextlib.contextmanager
def three_server_swarm(tmp_path: Path):
    """A tiny 4-block model served by three `swarm join` processes: a 0:2, b 2:3, c 3:4."""
    from kernels.tiny import write_tiny_checkpoint

    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=64)
    with ServingSwarm(tmp_path, checkpoint) as swarm:
        for name, blocks in (("a", "0:2"), ("b", "2:3"), ("c", "3:4")):
            swarm.join(name, blocks)
        swarm.wait_online("a", "b", "c")
        yield swarm


NOW = 1_000_000.0  # the fixed "now" of record-level tests (DHT time, seconds)
MODEL = ModelRecord(model_id="tiny", config_hash="abc", n_blocks=4)
HOSTILE = "<script>alert(1)</script>"
HUGE = "A" * 1_000_000


def make_server(peer: str, start: int, end: int, **changes) -> ServerRecord:
    """An ONLINE server record of blocks ``start:end``; ``changes`` override any field."""
    record = ServerRecord(
        peer_id=PeerId(peer),
        state=ServerState.ONLINE,
        span=Span(start, end),
        throughput=10.0,
        inference_rate=5.0,
        free_cache_tokens=1000,
        load=1,
        addresses=("tcp://127.0.0.1:1",),
        curve_public_key=b"k" * 40,
        version="0.1.0",
        device="cpu",
        dtype="float32",
        started_at=NOW - 90,
    )
    return dataclasses.replace(record, **changes)


def make_bound_server(identity, start: int, end: int, **changes) -> ServerRecord:
    """``make_server`` for ``identity``: its peer id, identity key and CURVE key (what readers accept)."""
    bound = {"curve_public_key": identity.curve_public_key, "identity_key": identity.public_key}
    return make_server(identity.peer_id, start, end, **{**bound, **changes})


def make_trainer(round_: int = 3, **changes):
    """A TRAINING trainer record at ``round_`` with a falling loss history; ``changes`` override any field."""
    from swarm.training.progress import TrainerState, TrainingPeerRecord

    record = TrainingPeerRecord(
        state=TrainerState.TRAINING,
        round=round_,
        inner_step=round_ * 10,
        loss=2.0,
        loss_history=tuple((r, 4.0 - r * 0.5) for r in range(round_ + 1)),
        tokens_per_second=100.0,
        bytes_last_round=1000,
        members_last_round=2,
        parameters_hash="h" * 64,
        addresses=("tcp://127.0.0.1:2",),
        curve_public_key=b"k" * 40,
        bandwidth=1e6,
        version="0.1.0",
        updated_at=NOW,
    )
    return dataclasses.replace(record, **changes)


def hostile_view():
    """A SwarmView whose peer-controlled strings are markup, escape codes and a megabyte of text."""
    from swarm.health import SwarmView

    servers = {
        "a": make_server("a", 0, 2, version=HOSTILE, device=HUGE, dtype="\x1b[31mred"),
        "b": make_server("b", 2, 4, version=HUGE),
    }
    model = ModelRecord(model_id=f'"><img src=x onerror=alert(1)>{HUGE}', config_hash=HOSTILE, n_blocks=4)
    runs = {"demo": {"t": make_trainer(2, version=HOSTILE)}}
    return SwarmView("s", model, servers, runs)


# ---------------------------------------------------------------- churn


class ChurnLoop:
    """Kills servers of a ``ServingSwarm`` at random and restarts them, never every holder of a span.

    Each server keeps its identity file, so a restarted server comes back under the same
    peer id (with a new start time and a new data-plane port). Run :meth:`run` in a thread;
    it returns once ``stop`` is set and every restarted server is ONLINE again.

    Args:
        swarm: the swarm; its servers must have been started with :meth:`join_server`.
        spans: server name -> its blocks (``"0:1"``); servers with equal blocks are holders
            of the same span.
        period: mean seconds between kills (each wait drawn from 0.5-1.5x).
        seed: for the choice of victims and waits.
    """

    def __init__(self, swarm: ServingSwarm, spans: dict[str, str], extra: dict[str, tuple[str, ...]],
                 period: float, seed: int = 0):  # fmt: skip
        import random
        import threading

        self.swarm = swarm
        self.spans = spans
        self.extra = extra
        self.period = period
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.kills: list[str] = []
        self._restarts: dict[str, int] = {}
        self._down: set[str] = set()

    def identity(self, name: str) -> str:
        return str(self.swarm.tmp_path / f"{name}.identity")

    def join_server(self, name: str) -> None:
        """Starts server ``name`` on its blocks with its identity file (logs to ``name[.n].log``)."""
        restarts = self._restarts.get(name, 0)
        log_name = name if restarts == 0 else f"{name}.{restarts}"
        args = ("--identity", self.identity(name), *self.extra.get(name, ()))
        self.swarm.servers[name] = self.swarm.join(log_name, self.spans[name], *args)
        if log_name != name:
            del self.swarm.servers[log_name]

    def _is_up(self, name: str) -> bool:
        return any("ONLINE" in line for line in list(self.swarm.servers[name].lines))

    def _victims(self) -> list[str]:
        for name in list(self._down):
            if self._is_up(name):
                self._down.discard(name)
        down_spans = {self.spans[name] for name in self._down}
        return sorted(name for name, blocks in self.spans.items() if blocks not in down_spans)

    def run(self) -> None:
        """Kills and restarts until ``stop`` is set; then waits for the restarted servers."""
        while not self.stop.wait(self.period * self.rng.uniform(0.5, 1.5)):
            victims = self._victims()
            if not victims:
                continue
            name = self.rng.choice(victims)
            self.swarm.servers[name].kill()
            self.kills.append(name)
            self._restarts[name] = self._restarts.get(name, 0) + 1
            self._down.add(name)
            self.join_server(name)
        for name in list(self._down):
            self.swarm.servers[name].wait_for_line("ONLINE", timeout=180)

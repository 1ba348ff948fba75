"""DiLoCo with real `swarm train` processes on 127.0.0.1: rounds, a kill mid all-reduce,
a late joiner, a restart from checkpoint, a clean leave; parameters bit-identical throughout.

Progress is read from each trainer's own log ("round N done: ... M members, hash H"),
which records every round, rather than by sampling the DHT, which can miss short rounds.
"""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

import pytest

from kernels.tiny import write_tiny_checkpoint
from peers.processes import PeerProcess, ProcessGroup
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN = "ci-run"
ROUND_DONE = re.compile(r"round (\d+) done: loss (\S+), (\d+) members, hash (\w+)")


@dataclass(frozen=True)
class Round:
    index: int
    loss: float
    members: int
    hash: str


def parse_round(line: str) -> Round | None:
    match = ROUND_DONE.search(line)
    if match is None:
        return None
    index, loss, members, digest = match.groups()
    return Round(int(index), float(loss), int(members), digest)


def rounds_of(process: PeerProcess) -> list[Round]:
    return [r for r in map(parse_round, list(process.lines)) if r is not None]


def wait_for_round(process: PeerProcess, what: str, condition, timeout: float = 180) -> Round:
    def matches(line: str) -> bool:
        done = parse_round(line)
        return done is not None and condition(done)

    return parse_round(process.wait_for(matches, what, timeout))


@pytest.fixture
def checkpoint(tmp_path):
    write_tiny_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64)
    return tmp_path / "model"


def test_three_trainers_survive_a_kill_mid_allreduce_and_admit_a_late_joiner(tmp_path, checkpoint):
    bootstrap = SwarmDHT(
        Identity.generate(), DHTConfig(swarm_name="ci", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    )
    bootstrap.start()
    group = ProcessGroup(tmp_path)
    initial = bootstrap.visible_maddrs()[0]
    common = [
        "train", "--model", str(checkpoint), "--init", "random", "--run", RUN, "--swarm", "ci",
        "--initial-peers", initial, "--inner-steps", "12", "--seq-len", "32", "--batch-size", "4",
        "--corpus-bytes", "300000", "--warmup-steps", "5", "--inner-lr", "2e-3",
        "--matchmaking-seconds", "6", "--phase-timeout", "4", "--record-ttl", "6",
    ]  # fmt: skip

    def trainer(name, *extra, env=None):
        args = [*common, "--identity", str(tmp_path / f"{name}.pem"), *extra]
        return group.start(name, args, env)

    try:
        a = trainer("a", "--checkpoint-dir", str(tmp_path / "ckpt-a"))
        b = trainer("b", "--metrics-port", "0")
        # c dies (SIGKILL, from inside) as it sends its reduced part in its second
        # all-reduce among three: mid all-reduce, after a round of all three.
        c = trainer("c", env={"SWARM_FAULT": "2:result:3"})
        for process in (a, b, c):
            process.wait_for_line("joined run", timeout=120)

        full = wait_for_round(a, "a round with 3 members", lambda r: r.members == 3)
        wait_for_round(b, "a round with 3 members", lambda r: r.members == 3)
        metrics_url = b.wait_for_line("metrics at", timeout=10).split()[-1]
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        group_size = re.search(rf'swarm_train_group_size{{run="{RUN}"}} (\S+)', metrics)
        assert group_size and float(group_size.group(1)) >= 2, metrics
        assert re.search(rf'swarm_train_round{{run="{RUN}"}} [1-9]', metrics), metrics

        assert c.process.wait(timeout=120) == -9
        c.wait_for_line("fault injection", timeout=5)
        # a and b finish the round c died in, and go on together
        for survivor in (a, b):
            wait_for_round(
                survivor, "a round of a and b after c died", lambda r: r.members == 2 and r.index > full.index
            )
        assert any("taking over part" in line or "repairing" in line for line in a.lines + b.lines)

        d = trainer("d")  # a late joiner downloads the state and contributes from its next round
        d.wait_for_line("synced state of round", timeout=120)
        wait_for_round(d, "a round with a, b and d", lambda r: r.members == 3)

        a_checkpoint = rounds_of(a)[-1].index  # a checkpoints each round before logging it
        a.kill()  # the run goes on without a; a restarts from its checkpoint and catches up
        for survivor in (b, d):
            wait_for_round(survivor, "two rounds past a's checkpoint", lambda r: r.index >= a_checkpoint + 2)
        a_again = trainer("a-again", "--checkpoint-dir", str(tmp_path / "ckpt-a"))
        a_again.wait_for_line("resumed from checkpoint", timeout=120)
        a_again.wait_for_line("synced state of round", timeout=120)
        wait_for_round(a_again, "a round with the restarted a, b and d", lambda r: r.members == 3)

        for process in (a_again, b, d):
            assert process.terminate(timeout=120) == 0
        hashes_by_round: dict[int, set[str]] = defaultdict(set)
        for process in (a, b, c, d, a_again):
            for done in rounds_of(process):
                if done.members >= 2:
                    hashes_by_round[done.index].add(done.hash)
        disagreements = {index: hashes for index, hashes in hashes_by_round.items() if len(hashes) > 1}
        assert not disagreements, f"members disagree after rounds: {disagreements}"
        history = rounds_of(b)
        assert history[-1].loss < history[0].loss, f"loss did not decrease: {history}"
    finally:
        group.close()
        bootstrap.shutdown()

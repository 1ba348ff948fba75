"""DiLoCo with a member behind a real NAT (issue #13 test 3): real `swarm train` processes
in network namespaces (``tests.netns.NatLab``; root only, skipped with the reason elsewhere).

The NATed member finds it cannot be dialled back, restarts its DHT to take a relay
reservation, and announces libp2p addresses through the relays. It dials the reachable
members out over ZeroMQ; they reach it over libp2p (a circuit through a relay, or a
hole-punched connection), so every result of the all-reduce reaches it directly: no
member of the group needs the repair path, and all three log the same parameter hash.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from tests.netns import NatLab, require_namespaces
from tests.test_nat import read_line, read_tagged, role

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROUND_DONE = re.compile(r"round (\d+) done: loss \S+, (\d+) members, hash (\w+)")
TROUBLE = re.compile(r"repairing|taking over part|to member \d+ failed|all-reduce failed|unreachable")
"""Log lines of a round that did not reach every member directly."""


@pytest.fixture(scope="module", autouse=True)
def _namespaces():
    require_namespaces()


def swarm_train(checkpoint, host: str, identity, initial_peers: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "peers.cli", "train", "--model", str(checkpoint), "--run", "nat-run",
        "--host", host, "--identity", str(identity), "--initial-peers", *initial_peers,
        "--inner-steps", "6", "--seq-len", "32", "--batch-size", "4", "--corpus-bytes", "200000",
        "--warmup-steps", "2", "--matchmaking-seconds", "10", "--phase-timeout", "20",
        "--record-ttl", "20", *extra,
    ]  # fmt: skip


class RoundLog:
    """Reads one process's output on a thread (so its pipe never fills), keeping its
    ``round N done`` lines and any trouble lines."""

    def __init__(self, name: str, process: subprocess.Popen, others: list[RoundLog]):
        self.name, self.process = name, process
        self.others = others  # their output goes into a failure's message too
        others.append(self)
        self.rounds: dict[int, tuple[int, str]] = {}  # round -> (members, hash)
        self.trouble: list[str] = []
        self.tail: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # ends when the lab kills the process
            with self._changed:
                self.tail = [*self.tail[-199:], line.rstrip()]
                if TROUBLE.search(line):
                    self.trouble.append(line.strip())
                done = ROUND_DONE.search(line)
                if done is not None:
                    index, members, digest = done.groups()
                    self.rounds[int(index)] = (int(members), digest)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def read_until(self, condition, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self) or self.ended, timeout):
                raise AssertionError(f"{self.name}: condition not met in {timeout}s;\n{self.outputs()}")
            if not condition(self):
                raise AssertionError(f"{self.name} exited ({self.process.poll()});\n{self.outputs()}")

    def outputs(self) -> str:
        return "\n".join(f"--- {log.name}:\n" + "\n".join(log.tail[-40:]) for log in self.others)


def rounds_with(members: int):
    return lambda log: [r for r, (m, _) in log.rounds.items() if m == members]


def test_member_behind_nat_trains_with_two_reachable_members(tmp_path):
    from kernels.tiny import write_tiny_checkpoint

    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=2, hidden_size=64)
    with NatLab() as lab:
        host_a, host_b, relays_host, home = (
            lab.public("a"),
            lab.public("b"),
            lab.public("relays"),
            lab.behind_nat("home"),
        )
        # four relay candidates: libp2p's autorelay reserves a slot at once with >= 4
        relays = read_tagged(
            relays_host.spawn(role("relay", "--host", relays_host.address, "--count", "4")), "READY"
        )
        a = host_a.spawn(swarm_train(checkpoint, host_a.address, tmp_path / "a.pem", [], "--init", "random"))
        bootstrap = read_line(a, "initial peer for others:").rsplit(" ", 1)[1]
        b = host_b.spawn(swarm_train(checkpoint, host_b.address, tmp_path / "b.pem", [bootstrap]))
        logs: list[RoundLog] = []
        log_a, log_b = RoundLog("a", a, logs), RoundLog("b", b, logs)
        # b is training with a: both are in the run's records, so they can check the newcomer
        log_b.read_until(lambda log: rounds_with(2)(log), timeout=180)

        c = home.spawn(
            swarm_train(
                checkpoint,
                home.address,
                tmp_path / "c.pem",
                [bootstrap, *relays["maddrs"]],
                "--reachability",
                "auto",
            )
        )
        verdict = read_line(c, "reachability:")
        assert verdict.startswith("reachability: relayed"), verdict
        read_line(c, "reached through libp2p as")
        log_c = RoundLog("c", c, logs)

        # the NATed member takes part in at least three full rounds
        log_c.read_until(lambda log: len(rounds_with(3)(log)) >= 3, timeout=240)
        full = sorted(rounds_with(3)(log_c))[:3]
        for log in (log_a, log_b):
            log.read_until(lambda log: all(r in log.rounds for r in full), timeout=120)
        for index in full:
            hashes = {log.name: log.rounds[index] for log in (log_a, log_b, log_c)}
            assert len(set(hashes.values())) == 1, f"round {index}: {hashes}"
        # every result reached every member directly, the NATed one over libp2p included
        for log in (log_a, log_b, log_c):
            assert not log.trouble, f"{log.name}: {log.trouble}"

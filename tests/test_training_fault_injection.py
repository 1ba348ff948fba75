"""``SWARM_FAULT``: the process layer's fault injection kills the trainer's own process at
an exact all-reduce message, counting only all-reduces among at least ``min_members``."""

import os
import subprocess
import sys

import pytest

from peers.faults import AllReduceFault

pytestmark = pytest.mark.timeout(60)

# Feeds a hook built from SWARM_FAULT the sends of a member's all-reduces (count, group size)
# and prints each one before it is handed to the hook; the last line printed is the fatal one.
FEED = """
import sys
from peers.faults import AllReduceFault
from swarm.training.averaging import AllReduceSend

hook = AllReduceFault.from_environment().before_send_hook()
for count, size in ((1, 2), (2, 3), (3, 1), (4, 3), (5, 3)):
    for kind in ("contribution", "result", "repair"):
        print(count, size, kind, flush=True)
        hook(AllReduceSend(count, f"run/{count}", kind, 0, size))
print("survived", flush=True)
"""


def _feed(fault: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-c", FEED], env={**os.environ, "SWARM_FAULT": fault},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.returncode, done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("fault", "fatal"),
    [
        ("2:result:3", "4 3 result"),  # the second all-reduce among three or more
        ("1:contribution", "1 2 contribution"),  # min_members defaults to 2
        ("2:repair", "2 3 repair"),
        ("4:result:1", "4 3 result"),  # groups of one count too (they send nothing)
    ],
)
def test_the_process_dies_at_the_named_message(fault, fatal):
    assert _feed(fault) == (-9, fatal)


def test_a_member_with_fewer_all_reduces_than_nth_survives():
    assert _feed("4:result:3") == (0, "survived")  # only three all-reduces among three or more


def test_a_malformed_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("SWARM_FAULT", "two:result")
    with pytest.raises(ValueError, match="SWARM_FAULT='two:result'"):
        AllReduceFault.from_environment()
    monkeypatch.delenv("SWARM_FAULT")
    assert AllReduceFault.from_environment() is None

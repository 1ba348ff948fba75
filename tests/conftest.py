"""Shared pytest configuration."""

import signal

from hypothesis import HealthCheck, settings

# Deterministic property tests: the same examples on every run and machine (no flakes
# from a lucky draw), no per-example deadline (shared CI machines are noisy).
settings.register_profile(
    "swarm", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("swarm")

# A test run started in the background by a shell without job control inherits SIGINT
# ignored, and so does every process it starts: a peer's Ctrl-C handling (tested by
# sending SIGINT) then never runs. The tests' processes get it as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

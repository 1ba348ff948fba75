"""Shared pytest configuration."""

from hypothesis import HealthCheck, settings

# Deterministic property tests: the same examples on every run and machine (no flakes
# from a lucky draw), no per-example deadline (shared CI machines are noisy).
settings.register_profile(
    "swarm", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("swarm")

"""Helpers shared by the benchmark programs: CPU steal, timing summaries, free ports."""

from __future__ import annotations

import socket
import statistics
import time
from contextlib import contextmanager


def read_cpu_times() -> tuple[int, int]:
    """(total jiffies, steal jiffies) from /proc/stat; (0, 0) where it does not exist."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    return sum(fields), fields[7] if len(fields) > 7 else 0


@contextmanager
def steal_meter(report: dict):
    """Records into ``report['steal_percent']`` the hypervisor's CPU steal during the block."""
    total_before, steal_before = read_cpu_times()
    try:
        yield report
    finally:
        total_after, steal_after = read_cpu_times()
        elapsed = total_after - total_before
        report["steal_percent"] = 100.0 * (steal_after - steal_before) / elapsed if elapsed else 0.0


def median(values: list[float]) -> float:
    return statistics.median(values)


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

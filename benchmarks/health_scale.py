"""The health page at swarm scale: one snapshot and one page load with 1,000 servers over 80 blocks.

A few crowd processes (``tests/health_peer_process.py crowd``) publish 1,000 server
records into a real hivemind DHT on 127.0.0.1, each record signed by its own identity;
a few are draining or joining and one 2-block range is left thin. Then:

- ``snapshot_s``: one read of the swarm (``read_swarm_view``, signatures checked) plus
  ``build_health_state``, the median of ``--reads`` by one reader node: the first read
  verifies every record (printed as ``cold_snapshot_s``), later ones only what changed,
  as a running ``swarm health`` does;
- ``render_s``: headless Chromium loads the page that ``swarm health`` serves and
  paints it (navigation start to the first frame after ``load``; median of 3 loads);
- ``page_kb``: the page's size.

Baseline, measured in the same run: a snapshot of a 4-server swarm through the same
reader (``small_snapshot_s``), so the scale cost is visible apart from the DHT's fixed
round trip. Goals (issue #21): snapshot_s <= 2.0, render_s <= 1.0, page_kb <= 500.

    python benchmarks/health_scale.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its transport.py benchmark
# would shadow the transport package: put the repository root there instead.
_ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = _ROOT

from benchmarks._common import steal_meter  # noqa: E402

HELPER = Path(_ROOT) / "tests" / "health_peer_process.py"
CHROMIUM = os.environ.get("SWARM_CHROMIUM", "/usr/bin/chromium")
SWARM = "scale"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


class Children:
    """Child processes in their own sessions, killed (with their DHT daemons) at the end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, args: list[str], prefix: str, timeout: float) -> str:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": _ROOT},
        )
        self.processes.append(process)
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if selector.select(left):
                    line = process.stdout.readline()
                    if line.startswith(prefix):
                        return line.strip()
                    if not line:
                        break
        raise RuntimeError(f"{args[:2]} printed no {prefix!r} line within {timeout}s (exit {process.poll()})")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def start_crowd(
    children: Children, swarm: str, servers: int, processes: int, blocks: int, folder: Path
) -> str:
    """Starts the crowd; returns the bootstrap multiaddr."""
    per_process = -(-servers // processes)
    bootstrap: list[str] = []
    for index in range(processes):
        count = min(per_process, servers - index * per_process)
        args = [str(HELPER), "crowd", "--swarm", swarm, "--blocks", str(blocks), "--count", str(count)]
        args += ["--first", str(index * per_process), "--thin", f"{blocks * 7 // 10}:{blocks * 7 // 10 + 2}"]
        args += ["--ttl", "240", "--period", "100", "--manifest", str(folder / f"crowd{index}.json")]
        ready = children.start([*args, "--initial-peers", *bootstrap[:1]], "READY", timeout=180)
        bootstrap.append(ready.split()[1])
    return bootstrap


async def time_snapshots(swarm: str, bootstrap: list[str], reads: int) -> tuple[list[float], dict]:
    from peers.health_server import SwarmViewConfig, open_dht
    from swarm.health import RunProgressTracker, build_health_state
    from swarm.health_reader import read_swarm_view

    view_config = SwarmViewConfig(swarm=swarm, initial_peers=tuple(bootstrap), request_timeout=180.0)
    times, state = [], {}
    async with open_dht(view_config) as dht:
        for _ in range(reads):
            started = time.perf_counter()
            view = await read_swarm_view(dht, swarm, timeout=view_config.request_timeout)
            state = build_health_state(view, now=time.time(), tracker=RunProgressTracker())
            times.append(time.perf_counter() - started)
    return times, state


def time_render(url: str, loads: int) -> tuple[list[float], int]:
    from playwright.sync_api import sync_playwright

    times = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000}, timeout=60_000,
        )  # fmt: skip
        try:
            page = browser.new_page()
            size = 0
            for _ in range(loads):
                response = page.goto(url, wait_until="load", timeout=60_000)
                size = len(response.body())
                # Navigation start to the first animation frame after `load`: parse, style, layout, paint.
                times.append(
                    page.evaluate(
                        "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame("
                        "() => done(performance.now() / 1000))))"
                    )
                )
        finally:
            browser.close()
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1,000 servers over 80 blocks, 3 reads (the README row)"
    )
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--processes", type=int, default=3, help="crowd processes publishing the records")
    parser.add_argument("--reads", type=int, default=5, help="snapshots timed (median reported)")
    args = parser.parse_args()
    if args.quick:
        args.servers, args.blocks, args.reads = 1000, 80, 3
    if not Path(CHROMIUM).exists():
        sys.exit(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SWARM_CHROMIUM)")
    children = Children()
    report: dict = {}
    try:
        with tempfile.TemporaryDirectory() as folder, steal_meter(report):
            small_boot = start_crowd(children, "small", 4, 1, 4, Path(folder))
            small, _ = asyncio.run(time_snapshots("small", small_boot, args.reads))
            started = time.perf_counter()
            bootstrap = start_crowd(children, SWARM, args.servers, args.processes, args.blocks, Path(folder))
            publish_s = time.perf_counter() - started
            times, state = asyncio.run(time_snapshots(SWARM, bootstrap, args.reads))
            health = ["-m", "peers.cli", "health", "--swarm", SWARM, "--initial-peers", *bootstrap]
            health += ["--port", "0", "--refresh-interval", "60", "--request-timeout", "180"]
            url = children.start(health, "swarm health: serving", timeout=400).split()[-1]
            renders, size = time_render(url, 3)
    finally:
        children.stop()
    seen = len(state.get("servers", []))
    print(
        f"publish_s={publish_s:.1f} servers_seen={seen} small_snapshot_s={statistics.median(small):.3f} "
        f"cold_snapshot_s={times[0]:.3f} "
        f"snapshot_runs_s={json.dumps([round(t, 3) for t in times])} render_runs_s={[round(t, 3) for t in renders]} "
        f"steal_percent={report['steal_percent']:.1f}"
    )
    print(
        f"health_scale servers={seen} blocks={args.blocks} snapshot_s={statistics.median(times):.3f} "
        f"render_s={statistics.median(renders):.3f} page_kb={size / 1024:.1f}"
    )


if __name__ == "__main__":
    main()

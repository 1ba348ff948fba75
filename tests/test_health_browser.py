"""End to end: a live swarm on 127.0.0.1, ``swarm health`` and ``swarm status`` as processes, the page in headless Chromium.

Two server processes cover a 4-block model (0:2 and 2:4) and one trainer publishes a run
with a loss history; records live 3 s and refresh every second. The test waits for the
page's live update, checks what a person would see, saves a screenshot
(``artifacts/health.png``, or ``$SWARM_HEALTH_SCREENSHOT``), kills one server with SIGKILL
and waits for its blocks to turn red.

At scale, two crowd processes publish 1,000 server records over 80 blocks (each signed by
its own identity; some draining or joining, twenty reported offline over a real MQTT
broker); the page must show the map, name the thin blocks, find one peer and chart its
history (screenshot ``artifacts/health-scale.png``, the README's ``docs/health-scale.png``).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "health_peer_process.py"
CHROMIUM = os.environ.get("SWARM_CHROMIUM", "/usr/bin/chromium")
SWARM = "browsertest"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Processes:
    """Starts child processes, waits for their ready lines, and kills them all at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[subprocess.Popen] = []

    def start(
        self, name: str, args: list[str], ready_prefix: str, timeout: float = 90.0
    ) -> tuple[subprocess.Popen, str]:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        self.children.append(process)
        return process, self.wait_line(process, name, ready_prefix, timeout)

    def wait_line(self, process: subprocess.Popen, name: str, prefix: str, timeout: float) -> str:
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
        log = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
        pytest.fail(
            f"{name} printed no {prefix!r} line within {timeout}s (exit code {process.poll()}):\n{log}"
        )

    def kill_all(self) -> None:
        for process in self.children:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture
def processes(tmp_path):
    children = Processes(tmp_path)
    yield children
    children.kill_all()


def screenshot_path(suffix: str = "") -> Path:
    """``artifacts/health.png`` (or ``$SWARM_HEALTH_SCREENSHOT``), with ``suffix`` before the extension."""
    base = Path(os.environ.get("SWARM_HEALTH_SCREENSHOT", REPO / "artifacts" / "health.png"))
    path = base.with_name(base.stem + suffix + base.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_health_page_shows_the_live_swarm_and_turns_red_when_a_server_dies(processes):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SWARM_CHROMIUM)")
    playwright_api = pytest.importorskip("playwright.sync_api")

    common = ["--swarm", SWARM, "--blocks", "4"]
    _, ready = processes.start("server-a", [str(HELPER), "server", "--span", "0:2", *common], "READY")
    bootstrap = ready.split()[1]
    server_b, ready_b = processes.start(
        "server-b", [str(HELPER), "server", "--span", "2:4", *common, "--initial-peers", bootstrap], "READY"
    )
    _, ready_a_id = ready, ready.split()[2]
    peer_b = ready_b.split()[2]
    processes.start(
        "trainer",
        [str(HELPER), "trainer", "--swarm", SWARM, "--run", "demo", "--initial-peers", bootstrap],
        "READY",
    )
    health_args = ["-m", "peers.cli", "health", "--swarm", SWARM, "--initial-peers", bootstrap, "--port", "0"]
    health_args += ["--refresh-interval", "0.5", "--poll-interval", "0.5", "--request-timeout", "5"]
    _, serving = processes.start("health", health_args, "swarm health: serving")
    url = serving.split()[-1]
    assert url.startswith("http://127.0.0.1:")

    # `swarm status` prints the same summary in the terminal.
    status = subprocess.run(
        [sys.executable, "-m", "peers.cli", "status", "--swarm", SWARM, "--initial-peers", bootstrap],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert "tiny-llama (4 blocks)" in status.stdout, status.stderr[-2000:]
    assert "run demo" in status.stdout and peer_b[:10] in status.stdout

    with tempfile.TemporaryDirectory() as profile, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile,  # a new, empty user-data-dir
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1100, "height": 1000},
            timeout=60_000,
        )
        try:
            page = browser.new_page()
            page.goto(url, timeout=30_000)
            # The live update (no reload) has replaced the content at least once.
            page.wait_for_function(
                "() => document.getElementById('refresh-status').textContent.startsWith('updated')",
                timeout=30_000,
            )
            page.wait_for_function(
                "() => document.querySelectorAll('.block.covered').length === 4"
                " && document.querySelectorAll('#servers tr[data-peer]').length === 2"
                " && document.querySelector('.run[data-run=demo] svg.loss-chart polyline') !== null",
                timeout=60_000,
            )
            assert page.locator(".block.uncovered").count() == 0
            peers = set(
                page.locator("#servers tr[data-peer]").evaluate_all("rows => rows.map(r => r.dataset.peer)")
            )
            assert peers == {ready_a_id, peer_b}
            assert page.locator("#model-verdict").inner_text() in ("healthy", "degraded")
            assert page.locator(".run[data-run=demo] svg.loss-chart").is_visible()
            page.screenshot(path=str(screenshot_path()), full_page=True)

            server_b.send_signal(signal.SIGKILL)
            page.wait_for_function(
                "() => document.querySelectorAll('.block.uncovered').length === 2", timeout=60_000
            )
            red = page.locator(".block.uncovered").evaluate_all(
                "bars => bars.map(b => [b.dataset.block, b.getAttribute('fill')])"
            )
            assert red == [["2", "#c62828"], ["3", "#c62828"]]
            assert page.locator("#model-verdict").inner_text() == "broken"
            assert page.locator("#servers tr[data-peer]").count() == 1
            page.screenshot(path=str(screenshot_path("-broken")), full_page=True)
        finally:
            browser.close()


SCALE_SWARM = "scaletest"
SCALE_SERVERS, SCALE_BLOCKS, THIN = 1000, 80, (56, 58)


@pytest.mark.timeout(600)
def test_health_page_reads_at_a_thousand_servers(processes, tmp_path):
    """1,000 signed server records over 80 blocks from two processes: the map, the thinnest
    blocks, a peer search and the history charts, in headless Chromium; some servers drain,
    some join, and twenty are reported offline over MQTT."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SWARM_CHROMIUM)")
    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    from tests.test_telemetry_mqtt import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        _run_scale_test(processes, tmp_path, broker.url, playwright_api)
    finally:
        broker.stop()


def _run_scale_test(processes, tmp_path: Path, mqtt: str, playwright_api) -> None:
    bootstrap: list[str] = []
    manifest = []
    half = SCALE_SERVERS // 2
    for index in range(2):
        path = tmp_path / f"crowd{index}.json"
        args = [
            str(HELPER),
            "crowd",
            "--swarm",
            SCALE_SWARM,
            "--blocks",
            str(SCALE_BLOCKS),
            "--count",
            str(half),
        ]
        args += ["--first", str(index * half), "--thin", f"{THIN[0]}:{THIN[1]}", "--mqtt", mqtt]
        args += [
            "--ttl",
            "240",
            "--period",
            "100",
            "--manifest",
            str(path),
            "--initial-peers",
            *bootstrap[:1],
        ]
        _, ready = processes.start(f"crowd{index}", args, "READY", timeout=240)
        # hivemind drops store and find calls slower than 3 s, which a loaded crowd node can
        # be; the reader bootstraps from every crowd process so it asks each one directly.
        bootstrap.append(ready.split()[1])
        manifest += json.loads(path.read_text())
    processes.start(
        "trainer", [str(HELPER), "trainer", "--swarm", SCALE_SWARM, "--run", "demo", "--initial-peers", *bootstrap[:1]],
        "READY",
    )  # fmt: skip
    health_args = ["-m", "peers.cli", "health", "--swarm", SCALE_SWARM, "--initial-peers", *bootstrap]
    health_args += [
        "--port",
        "0",
        "--refresh-interval",
        "1",
        "--poll-interval",
        "1",
        "--request-timeout",
        "60",
    ]
    health_args += ["--mqtt", mqtt, "--history-window", "120"]
    _, serving = processes.start("health", health_args, "swarm health: serving", timeout=180)
    url = serving.split()[-1]
    offline = sum(entry["state"] == "offline" for entry in manifest)
    target = next(entry for entry in manifest if entry["state"] == "draining")

    with tempfile.TemporaryDirectory() as profile, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1200, "height": 1000}, timeout=60_000,
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(url, timeout=60_000)
            waits = {
                "all servers listed": f"document.querySelectorAll('#servers tr[data-peer]').length === {SCALE_SERVERS}",
                "offline over MQTT": f"document.querySelectorAll('#servers tr[data-state=offline]').length === {offline}",
                "history points": "Number(document.querySelector('svg.history-chart[data-series=servers_online]')"
                "?.dataset.points || 0) >= 3",
                "run history": "document.querySelector('svg[data-series=\"demo:loss\"] polyline') !== null",
            }
            for what, condition in waits.items():
                try:
                    page.wait_for_function(f"() => {condition}", timeout=180_000, polling=500)
                except playwright_api.TimeoutError:
                    pytest.fail(
                        f"the page never showed {what}: {page.locator('#content').inner_text()[:1500]}"
                    )
            # The map: bands, not a thousand rows; every server counted once.
            bands = page.locator("#swarm-map g.band")
            assert 1 < bands.count() <= 40
            counts = bands.evaluate_all(
                "bands => bands.map(b => Number(b.lastElementChild.textContent.split(' ')[0]))"
            )
            assert sum(counts) == SCALE_SERVERS
            assert page.locator("#swarm-map rect.state-draining").count() > 0
            assert page.locator("#swarm-map rect.state-offline").count() > 0
            assert page.locator(".block.covered").count() == SCALE_BLOCKS
            # The thin spot is called out by name, and outlined in the strip.
            thinnest = page.locator("#thinnest .thin-block").evaluate_all(
                "items => items.map(i => i.dataset.block)"
            )
            assert sorted(thinnest) == [str(block) for block in range(*THIN)]
            assert page.locator(".block.thinnest").count() == len(thinnest)
            # Rows are collapsed at this scale; a search opens the band of the peer it finds.
            assert not page.locator(f'tr[data-peer="{target["peer"]}"]').is_visible()
            page.fill("#peer-search", target["peer"][:12])
            row = page.locator("tr.hit")
            assert row.count() == 1 and row.get_attribute("data-peer") == target["peer"]
            assert row.is_visible()
            start, end = target["span"]
            found = page.locator("#search-result").inner_text()
            assert "draining" in found and f"blocks {start}:{end}" in found
            assert page.locator("#swarm-map g.band.hit").count() == 1
            # The search survives the live refresh.
            refreshed = page.locator("#refresh-status").inner_text()
            page.wait_for_function(
                f"() => document.getElementById('refresh-status').textContent !== {json.dumps(refreshed)}",
                timeout=30_000,
            )
            assert page.locator("tr.hit").get_attribute("data-peer") == target["peer"]
            page.fill("#peer-search", "")
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(
                path=str(screenshot_path("-scale")),
                clip={"x": 0, "y": 0, "width": 1200, "height": 1900},
                full_page=True,
            )
        finally:
            browser.close()

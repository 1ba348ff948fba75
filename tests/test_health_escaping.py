"""Hostile strings from the DHT and MQTT show as text on the health page and never run (issue #14).

A peer on a real DHT announces a model, a server and a training member whose names,
versions, device, dtype, address and reachability reason are script and markup payloads
(``<script>``, ``<img onerror>``, ``<svg onload>``, quotes that would end an attribute);
over a real Mosquitto broker it publishes signed telemetry with more of them, and a forger
publishes on a topic named like markup. ``swarm health`` runs as a process; headless
Chromium loads the page and waits for a live update (the ``/fragment`` swap). No payload
runs (no dialog, no global set), no element the payloads would create exists, and the
text the payloads carry shows literally where the page shows those fields.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import aiomqtt
import pytest

from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.reachability import Reachability
from swarm.records import ModelRecord, ServerRecord, ServerState, model_key, server_record_entries
from swarm.spans import Span
from swarm.telemetry import encode_message, parse_mqtt_url, server_telemetry_state
from swarm.training.progress import TrainerState, TrainingPeerRecord, run_index_entry, run_key
from tests.test_health_browser import CHROMIUM, CHROMIUM_ARGS, processes  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SWARM = "escapetest"
# Each under the page's 80-character clip; each sets window.__pwned (or opens a dialog) if it runs.
SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
IMAGE = '"><img src=x onerror="window.__pwned=2;alert(2)">'
SVG = "'><svg onload=window.__pwned=3>"
ATTRIBUTE = '" onmouseover="window.__pwned=4" autofocus onfocus="window.__pwned=5" x="'
PAYLOADS = (SCRIPT, IMAGE, SVG, ATTRIBUTE)


def _records(identity: Identity, started: float) -> dict:
    server = ServerRecord(
        peer_id=identity.peer_id,
        state=ServerState.ONLINE,
        span=Span(0, 2),
        throughput=100.0,
        inference_rate=20.0,
        free_cache_tokens=4096,
        load=0,
        addresses=(f"tcp://{IMAGE}:1",),
        curve_public_key=identity.curve_public_key,
        identity_key=identity.public_key,
        version=SCRIPT,
        device=SVG,
        dtype=ATTRIBUTE,
        started_at=started,
        reachability=Reachability(direct=False, reason=IMAGE),
        libp2p_peer="12D3KooWx",
    )
    trainer = TrainingPeerRecord(
        state=TrainerState.TRAINING,
        round=3,
        inner_step=30,
        loss=2.0,
        loss_history=((1, 3.0), (2, 2.5), (3, 2.0)),
        tokens_per_second=100.0,
        bytes_last_round=1000,
        members_last_round=1,
        parameters_hash=SCRIPT,
        addresses=(f"tcp://{SVG}:1",),
        curve_public_key=identity.curve_public_key,
        bandwidth=1e7,
        version=IMAGE,
        updated_at=started,
    )
    model = ModelRecord(model_id=IMAGE, config_hash=SCRIPT, n_blocks=2)
    return {
        model_key(SWARM): model.to_wire(),
        **server_record_entries(SWARM, server),
        run_key(SWARM, "demo"): trainer.to_wire(),
        **run_index_entry(SWARM, "demo"),
    }


async def _publish_telemetry(url: str, identity: Identity, server: ServerRecord) -> None:
    endpoint = parse_mqtt_url(url)
    stranger = Identity.generate()  # not in the DHT: the page must not show it at all
    hostile_state = server_telemetry_state(server)
    messages = {
        identity.peer_id: encode_message(
            SWARM, identity, online=True, state=hostile_state, sent_at=time.time(), session="e"
        ),
        stranger.peer_id: encode_message(
            SWARM, stranger, online=True, state=hostile_state, sent_at=time.time(), session="e"
        ),
        IMAGE.replace("/", ""): b'{"schema": 2, "signed": "<script>window.__pwned=6</script>"}',  # forged
    }
    async with asyncio.timeout(30), aiomqtt.Client(endpoint.host, endpoint.port) as client:
        for peer, payload in messages.items():
            await client.publish(endpoint.topic(SWARM, peer), payload, qos=1, retain=True)


def test_hostile_strings_from_the_dht_and_mqtt_show_literally_and_never_run(processes, tmp_path):  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SWARM_CHROMIUM)")
    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    from tests.test_telemetry_mqtt import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    identity = Identity.generate()
    config = DHTConfig(swarm_name=SWARM, host_maddrs=("/ip4/127.0.0.1/tcp/0",), record_ttl=240)
    try:
        with SwarmDHT(identity, config) as dht:
            records = _records(identity, started=time.time())
            asyncio.run(dht.publish_many(records))
            server = ServerRecord.from_wire(identity.peer_id, records[f"{SWARM}.block.0"])
            asyncio.run(_publish_telemetry(broker.url, identity, server))
            health = [
                "-m",
                "peers.cli",
                "health",
                "--swarm",
                SWARM,
                "--initial-peers",
                dht.visible_maddrs()[0],
            ]
            health += [
                "--port",
                "0",
                "--refresh-interval",
                "0.5",
                "--poll-interval",
                "0.5",
                "--mqtt",
                broker.url,
            ]
            _, serving = processes.start("health", health, "swarm health: serving")
            _check_page(playwright_api, serving.split()[-1], identity.peer_id)
    finally:
        broker.stop()


def _check_page(playwright_api, url: str, peer_id: str) -> None:
    with tempfile.TemporaryDirectory() as profile, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000
        )
        try:
            page = browser.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(url, timeout=30_000)
            # Everything arrived (the server row with its MQTT overlay, the run, the forgery
            # counted), and the live update has swapped the content in at least once since.
            try:
                page.wait_for_function(
                    "() => document.querySelector('#servers tr[data-peer] td:last-child')?.textContent === 'dht+mqtt'"
                    " && document.querySelector('.run[data-run=demo]') !== null"
                    " && document.body.textContent.includes('dropped 1 forged')",
                    timeout=60_000,
                )
            except playwright_api.TimeoutError:
                with urllib.request.urlopen(url + "api/state", timeout=10) as response:
                    pytest.fail(
                        f"the page never showed everything; /api/state: {response.read().decode()[:4000]}"
                    )
            page.evaluate("() => { document.getElementById('refresh-status').textContent = ''; }")
            page.wait_for_function(
                "() => document.getElementById('refresh-status').textContent.startsWith('updated')",
                timeout=30_000,
            )
            page.locator("#servers tr[data-peer]").hover()  # an injected onmouseover would fire now
            assert page.evaluate("() => window.__pwned") is None
            assert dialogs == []
            injected = page.evaluate(
                "() => document.querySelectorAll('img, svg[onload], [onerror], [onload], [onmouseover], [onfocus]')"
                ".length"
            )
            assert injected == 0
            assert page.evaluate("() => document.scripts.length") == 1  # the page's own refresh script
            text = page.evaluate("() => document.body.innerText")
            row = page.locator("#servers tr[data-peer]")
            assert row.get_attribute("data-peer") == peer_id
            cells = row.locator("td").all_inner_texts()
            assert cells[2] == SCRIPT  # version
            assert cells[3] == f"{SVG} {ATTRIBUTE}"  # device, dtype
            relayed = row.locator("span.relayed")
            assert relayed.get_attribute("title") == f"behind NAT, reached through a relay: {IMAGE}"
            assert f"Model {IMAGE}" in page.locator("#model h2").inner_text()
            for payload in (SCRIPT, IMAGE, SVG):
                assert payload in text
            assert page.locator("#servers tr[data-peer]").count() == 1  # the stranger is not shown
        finally:
            browser.close()

"""Signed MQTT telemetry (issue #14): forgeries and replays are dropped and counted.

The freshness rules are checked with an injected clock; the rest runs against a real
Mosquitto broker (``tests.test_telemetry_mqtt``'s fixture), a real publisher and the
health service's feed, ``/api/state`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.request

import aiomqtt
import pytest

from peers.health_server import HealthConfig, HealthService, SwarmViewConfig
from swarm.health import SwarmView
from swarm.identity import Identity
from swarm.telemetry import (
    ForgedTelemetry,
    PeerTelemetry,
    decode_message,
    encode_message,
    server_telemetry_state,
)
from swarm.telemetry_freshness import TelemetryFreshness
from tests.harness import MODEL, make_server, wait_until
from tests.test_telemetry_mqtt import PEER1 as PEER
from tests.test_telemetry_mqtt import SWARM, broker, make_feed, make_publisher  # noqa: F401 - broker is a fixture

pytestmark = pytest.mark.timeout(120)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _message(sent_at: float, session: str = "s1", *, will: bool = False) -> PeerTelemetry:
    return PeerTelemetry(online=not will, sent_at=sent_at, session=session, will=will)


def test_freshness_accepts_newer_messages_and_one_will_per_session():
    fresh = TelemetryFreshness(max_age=60, max_skew=5)
    assert fresh.judge("p", _message(100.0), now=100.0) is None
    assert fresh.judge("p", _message(100.0), now=101.0) == "replayed"  # the same message again
    assert fresh.judge("p", _message(99.0), now=101.0) == "replayed"  # an older one
    assert fresh.judge("p", _message(110.0), now=110.0) is None
    assert fresh.judge("p", _message(200.0), now=110.0) == "stale"  # dated far ahead of our clock
    # The will of the current session, signed at connect (long ago), counts once.
    assert fresh.judge("p", _message(50.0, will=True), now=500.0) is None
    assert fresh.judge("p", _message(50.0, will=True), now=501.0) == "replayed"
    # A new session; then the old session's will (or its messages) come back: replays.
    assert fresh.judge("p", _message(600.0, "s2"), now=600.0) is None
    assert fresh.judge("p", _message(50.0, "s1", will=True), now=601.0) == "replayed"
    assert fresh.judge("p", _message(110.0, "s1"), now=601.0) == "replayed"
    # A peer heard of first through its will: accepted only while the will is fresh.
    assert fresh.judge("q", _message(10.0, will=True), now=500.0) == "stale"
    assert fresh.judge("r", _message(490.0, will=True), now=500.0) is None
    assert fresh.judge("s", _message(100.0), now=500.0) == "stale"  # too old a first message


def test_decode_rejects_unsigned_moved_and_tampered_messages():
    other = Identity.generate()
    # a bound record (with its binary identity key) travels too
    bound = make_server(
        PEER.peer_id, 0, 4, load=3, curve_public_key=PEER.curve_public_key, identity_key=PEER.public_key
    )
    state = server_telemetry_state(bound)
    genuine = encode_message(SWARM, PEER, online=True, state=state, sent_at=1.0, session="s")
    assert decode_message(genuine, swarm=SWARM, peer=PEER.peer_id).server.load == 3
    tampered = json.loads(genuine)
    tampered["signed"] = tampered["signed"].replace('"load":3', '"load":999')
    impostor = encode_message(SWARM, other, online=True, state=state, sent_at=1.0, session="s")
    cases = {
        "tampered": (json.dumps(tampered).encode(), SWARM, PEER.peer_id),
        "signed by another key": (impostor, SWARM, PEER.peer_id),
        "another swarm's topic": (genuine, "elsewhere", PEER.peer_id),
        "unsigned": (
            json.dumps({"schema": 1, "peer": PEER.peer_id, "swarm": SWARM, "online": True}).encode(),
            SWARM,
            PEER.peer_id,
        ),
    }
    for what, (payload, swarm, peer) in cases.items():
        with pytest.raises(ForgedTelemetry):
            decode_message(payload, swarm=swarm, peer=peer)
        assert what


def test_health_service_drops_and_counts_forged_and_replayed_telemetry(broker):  # noqa: F811
    record = make_server(PEER.peer_id, 0, 4, load=1)
    view = SwarmView(SWARM, MODEL, {PEER.peer_id: record})
    attacker = Identity.generate()
    current = {"load": 5}

    async def read_view() -> SwarmView:
        return view

    async def main():
        service: HealthService
        feed = make_feed(broker.url, on_update=lambda: service.rebuild())
        config = HealthConfig(
            view=SwarmViewConfig(swarm=SWARM), port=0, mqtt=broker.url, refresh_interval=3600
        )
        service = HealthService(config, read_view, feed=feed)
        publisher = make_publisher(
            broker.url, lambda: server_telemetry_state(dataclasses.replace(record, load=current["load"]))
        )
        topic = publisher.topic
        captured: list[bytes] = []
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        async with (
            asyncio.TaskGroup() as group,
            aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as spy,
        ):
            await spy.subscribe(topic, qos=1, timeout=5)

            async def record_traffic():
                async for message in spy.messages:
                    captured.append(bytes(message.payload))

            spying = group.create_task(record_traffic())
            serving = group.create_task(service.serve(ready.set_result))
            publishing = group.create_task(publisher.run())
            url = await asyncio.wait_for(ready, 10)

            def load() -> int | None:
                servers = service.state["servers"]
                return servers[0]["load"] if servers and servers[0]["source"] == "dht+mqtt" else None

            await wait_until(load, until=lambda value: value == 5, what="the genuine load")
            old = (await wait_until(lambda: captured, what="the spy to see the first message"))[0]
            current["load"] = 7
            publisher.notify()
            await wait_until(load, until=lambda value: value == 7, what="the newer load")
            publisher.stop()
            await publishing  # the clean exit's offline message is the newest one now
            await wait_until(
                lambda: service.state["servers"][0]["state"], until=lambda s: s == "offline", what="offline"
            )

            forged = encode_message(SWARM, attacker, online=True, sent_at=publisher._clock(), session="x",
                                    state=server_telemetry_state(dataclasses.replace(record, load=666)))  # fmt: skip
            async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as client:
                await client.publish(topic, forged, qos=1, retain=True, timeout=5)  # in PEER's name, A's key
                await client.publish(topic, old, qos=1, retain=True, timeout=5)  # PEER's own, older message
            await wait_until(
                lambda: feed.rejected,
                until=lambda r: r["forged"] >= 1 and r["replayed"] >= 1,
                what="both dropped",
            )
            service.rebuild()
            state = service.state
            api = json.loads(await asyncio.to_thread(_get, url + "api/state"))
            metrics = await asyncio.to_thread(_get, url + "metrics")
            page = await asyncio.to_thread(_get, url)
            serving.cancel()
            spying.cancel()
            return state, api, metrics, page, feed.rejected

    state, api, metrics, page, rejected = asyncio.run(main())
    assert rejected == {"forged": 1, "replayed": 1, "stale": 0, "malformed": 0}
    assert state["servers"][0]["state"] == "offline"  # neither the forgery nor the replay took effect
    assert api["sources"]["mqtt_rejected"] == rejected
    assert f'swarm_telemetry_rejected_total{{cause="forged",swarm="{SWARM}"}} 1.0' in metrics
    assert f'swarm_telemetry_rejected_total{{cause="replayed",swarm="{SWARM}"}} 1.0' in metrics
    assert "dropped 1 forged, 1 replayed" in page

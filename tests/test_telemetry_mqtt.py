"""MQTT telemetry against a real Mosquitto broker on a free loopback port."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiomqtt
import pytest

from peers.health_feed import TelemetryFeed
from peers.health_server import HealthConfig, HealthService, SwarmViewConfig
from peers.telemetry_publisher import TelemetryConfig, TelemetryPublisher
from swarm.health import SwarmView
from swarm.identity import Identity
from swarm.telemetry import MAX_PAYLOAD_BYTES, encode_message, parse_mqtt_url, server_telemetry_state
from tests.harness import MODEL, ProcessSwarm, free_port, make_server, wait_until, wait_until_sync

pytestmark = pytest.mark.timeout(120)

SWARM = "s"
PEER1 = Identity.generate()  # the publishing peer of most tests
PEER1_ID = PEER1.peer_id
REPO = Path(__file__).resolve().parent.parent


class Mosquitto:
    """A Mosquitto broker on 127.0.0.1:``port`` that the test can stop and restart."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = directory / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}/telemetry"

    def start(self, timeout: float = 10.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=log, stderr=log)
        wait_until_sync(
            self._accepting, timeout=timeout, what=f"mosquitto to accept connections on {self.port}"
        )

    def _accepting(self) -> bool:
        """Whether the broker accepts connections; raises, with its log, once it has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def broker(tmp_path):
    if shutil.which("mosquitto") is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    mosquitto = Mosquitto(tmp_path)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def live_dht(tmp_path):
    """A bootstrap DHT on 127.0.0.1 and a group for peer processes: (initial peer, group)."""
    with ProcessSwarm(tmp_path, SWARM) as live:
        yield live.peers[0], live.group


def fast_config(url: str) -> TelemetryConfig:
    return TelemetryConfig(url=url, period=0.2, timeout=1.0, max_reconnect_delay=0.2)


def make_publisher(url: str, snapshot) -> TelemetryPublisher:
    """Peer ``PEER1``'s publisher, fast (``fast_config``), publishing ``snapshot()``."""
    return TelemetryPublisher(fast_config(url), swarm=SWARM, identity=PEER1, snapshot=snapshot)


def make_feed(url: str, on_update=lambda: None) -> TelemetryFeed:
    return TelemetryFeed(
        parse_mqtt_url(url), SWARM, timeout=1.0, max_reconnect_delay=0.2, on_update=on_update
    )


def test_parse_mqtt_url_and_config_errors():
    endpoint = parse_mqtt_url("mqtt://broker:1884/a/b")
    assert (endpoint.host, endpoint.port, endpoint.prefix) == ("broker", 1884, "a/b")
    assert endpoint.topic("s", "p") == "a/b/s/p"
    assert parse_mqtt_url("mqtt://broker").port == 1883 and parse_mqtt_url("mqtt://broker").prefix == "swarm"
    for bad in ("http://x", "mqtt://", "mqtt://x/a/#", "mqtt://x:99999"):
        with pytest.raises(ValueError, match="--mqtt"):
            parse_mqtt_url(bad)
    with pytest.raises(ValueError, match="--telemetry-period"):
        TelemetryConfig(url="mqtt://x", period=0)
    with pytest.raises(ValueError, match="--mqtt-timeout"):
        TelemetryConfig(url="mqtt://x", timeout=0)


def test_publisher_feed_round_trip_retained_and_offline_on_stop(broker):
    record = make_server(PEER1_ID, 0, 4)
    current = {"record": record}

    async def main() -> None:
        publisher = make_publisher(broker.url, lambda: server_telemetry_state(current["record"]))
        async with asyncio.TaskGroup() as group:
            group.create_task(publisher.run())
            await wait_until(lambda: publisher.published >= 1, what="first publication")
            # A reader that connects later gets the retained state at once.
            feed = make_feed(broker.url)
            feed_task = group.create_task(feed.run())
            await wait_until(lambda: PEER1_ID in feed.peers, what="retained message")
            assert feed.peers[PEER1_ID].online and feed.peers[PEER1_ID].server.load == record.load
            current["record"] = dataclasses.replace(record, load=42)
            publisher.notify()
            await wait_until(lambda: feed.peers[PEER1_ID].server.load == 42, what="update after notify")
            publisher.stop()
            await wait_until(lambda: not feed.peers[PEER1_ID].online, what="offline message")
            feed_task.cancel()

    asyncio.run(main())


def test_last_will_marks_a_killed_peer_offline(broker):
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from peers.telemetry_publisher import TelemetryConfig, TelemetryPublisher
        from swarm.identity import Identity
        from swarm.telemetry import server_telemetry_state
        from tests.harness import make_server
        async def main():
            config = TelemetryConfig(url={broker.url!r}, period=0.2, timeout=1.0)
            identity = Identity.generate()
            state = server_telemetry_state(make_server(identity.peer_id, 0, 4))
            publisher = TelemetryPublisher(config, swarm={SWARM!r}, identity=identity, snapshot=lambda: state)
            async def report():
                while publisher.published < 1:
                    await asyncio.sleep(0.02)
                print("READY", publisher.peer_id, flush=True)
            async with asyncio.TaskGroup() as group:
                group.create_task(publisher.run())
                group.create_task(report())
        asyncio.run(main())
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:

        async def main() -> None:
            feed = make_feed(broker.url)
            async with asyncio.TaskGroup() as group:
                task = group.create_task(feed.run())
                line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
                assert line.startswith("READY")
                doomed = line.split()[1]
                await wait_until(lambda: doomed in feed.peers, what="the peer's first message")
                process.kill()
                await wait_until(lambda: not feed.peers[doomed].online, what="the last will")
                assert feed.peers[doomed].will and sum(feed.rejected.values()) == 0
                task.cancel()

        asyncio.run(main())
    finally:
        process.kill()
        process.wait(10)


def test_broker_outage_neither_blocks_nor_stops_the_publisher(broker):
    current = {"record": make_server(PEER1_ID, 0, 4)}

    async def main() -> None:
        publisher = make_publisher(broker.url, lambda: server_telemetry_state(current["record"]))
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        async with asyncio.TaskGroup() as group:
            heartbeat_task = group.create_task(heartbeat())
            publisher_task = group.create_task(publisher.run())
            await wait_until(lambda: publisher.published >= 1, what="first publication")

            broker.stop()
            await wait_until(lambda: publisher.failures >= 2, what="publisher noticing the outage")
            for load in range(20):
                current["record"] = dataclasses.replace(current["record"], load=load)
                publisher.notify()  # must return at once while the broker is down
            ticks_before = ticks
            await wait_until(lambda: ticks >= ticks_before + 10, what="the event loop to keep running")
            assert not publisher_task.done() and not publisher.connected

            broker.start()
            current["record"] = dataclasses.replace(current["record"], load=99)
            feed = make_feed(broker.url)
            feed_task = group.create_task(feed.run())
            await wait_until(
                lambda: PEER1_ID in feed.peers and feed.peers[PEER1_ID].server.load == 99,
                what="messages flowing after the broker came back",
            )
            publisher.stop()
            await wait_until(publisher_task.done, what="publisher to stop")
            feed_task.cancel()
            heartbeat_task.cancel()

    asyncio.run(main())


def test_feed_skips_hostile_messages(broker):
    async def main() -> None:
        feed = make_feed(broker.url)
        endpoint = parse_mqtt_url(broker.url)
        async with asyncio.TaskGroup() as group:
            task = group.create_task(feed.run())
            await wait_until(lambda: feed.connected, what="feed subscription")
            good, other = Identity.generate(), Identity.generate()
            good_state = server_telemetry_state(make_server(good.peer_id, 0, 4))
            now = time.time()

            def signed(identity, **fields):
                return encode_message(SWARM, identity, **{"online": True, "state": good_state, "sent_at": now,
                                                          "session": "s1", **fields})  # fmt: skip

            junk = {
                "wrongpeer": signed(other),  # other's genuine message on another topic
                "notjson": b"<script>alert(1)</script>",
                "deep": b"[" * 200_000,  # under the size limit, but json.loads recurses past the stack
                "huge": b"x" * (MAX_PAYLOAD_BYTES + 1),
                "badonline": json.dumps({"peer": "badonline", "swarm": SWARM, "online": "yes"}).encode(),
            }
            bad_state = Identity.generate()
            junk[bad_state.peer_id] = signed(bad_state, state={"kind": "server"})
            async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as client:
                for peer, payload in junk.items():
                    await client.publish(endpoint.topic(SWARM, peer), payload, qos=1, timeout=5)
                await client.publish(endpoint.topic(SWARM, good.peer_id), signed(good), qos=1, timeout=5)
            await wait_until(lambda: good.peer_id in feed.peers, what="the valid message")
            assert set(feed.peers) == {good.peer_id}
            assert feed.rejected == {"forged": 2, "replayed": 0, "stale": 0, "malformed": 4}
            task.cancel()

    asyncio.run(main())


def test_health_service_uses_the_mqtt_feed_for_live_updates(broker):
    """With --mqtt the snapshot follows telemetry between DHT reads; the DHT stays authoritative for membership."""
    record = make_server(PEER1_ID, 0, 4, load=1)
    view = SwarmView(SWARM, MODEL, {PEER1_ID: record})

    async def read_view() -> SwarmView:
        return view

    async def main() -> None:
        service: HealthService
        feed = make_feed(broker.url, on_update=lambda: service.rebuild())
        config = HealthConfig(
            view=SwarmViewConfig(swarm=SWARM), port=0, mqtt=broker.url, refresh_interval=3600
        )
        service = HealthService(config, read_view, feed=feed)
        publisher = make_publisher(
            broker.url, lambda: server_telemetry_state(dataclasses.replace(record, load=17))
        )
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        async with asyncio.TaskGroup() as group:
            serving = group.create_task(service.serve(ready.set_result))
            publishing = group.create_task(publisher.run())
            await asyncio.wait_for(ready, 10)
            await wait_until(
                lambda: service.state["servers"] and service.state["servers"][0]["load"] == 17,
                what="live load",
            )
            assert service.state["servers"][0]["source"] == "dht+mqtt"
            assert service.state["sources"]["mqtt_connected"]
            publisher.stop()
            await wait_until(lambda: service.state["servers"][0]["state"] == "offline", what="offline state")
            serving.cancel()
            publishing.cancel()

    asyncio.run(main())


@pytest.mark.slow
def test_swarm_join_publishes_telemetry_and_serves_metrics(broker, live_dht, tmp_path):
    """A real `swarm join` with --mqtt and --metrics-port: its state reaches the feed, /metrics
    shows its span and budget, and SIGTERM leaves an "offline" message behind."""
    import urllib.request

    from kernels.tiny import write_tiny_checkpoint

    initial_peer, group = live_dht
    write_tiny_checkpoint(tmp_path / "model", num_layers=2, hidden_size=32)
    server = group.start(
        "server",
        ["join", "--model", str(tmp_path / "model"), "--blocks", "0:2", "--swarm", SWARM,
         "--initial-peers", initial_peer, "--cache-tokens", "512",
         "--metrics-port", "0", "--mqtt", broker.url, "--telemetry-period", "0.2"],
    )  # fmt: skip
    peer_id = server.wait_for_line("ONLINE", timeout=120).split()[-1]
    url = server.wait_for_line("metrics at", timeout=10).split()[-1]
    with urllib.request.urlopen(url, timeout=10) as response:
        metrics = response.read().decode()
    for line in ("swarm_serve_online 1.0", "swarm_serve_first_block 0.0", "swarm_serve_end_block 2.0",
                 "swarm_serve_cache_tokens_total 512.0", "swarm_serve_forwards_total 0.0"):  # fmt: skip
        assert line in metrics, metrics

    def online(feed) -> bool:
        return peer_id in feed.peers and feed.peers[peer_id].server is not None

    def check(feed):
        live = feed.peers[peer_id]
        assert live.online and (live.server.span.start, live.server.span.end) == (0, 2)

    asyncio.run(follow_until_offline(broker, server, online, check, lambda key: key == peer_id))


@pytest.mark.slow
def test_swarm_train_publishes_telemetry(broker, live_dht, tmp_path):
    """A real `swarm train` with --mqtt: its run, round and loss reach the feed; SIGTERM
    leaves an "offline" message behind."""
    from kernels.tiny import write_tiny_checkpoint

    initial_peer, group = live_dht
    write_tiny_checkpoint(tmp_path / "model", num_layers=1, hidden_size=32)
    trainer = group.start(
        "trainer",
        ["train", "--model", str(tmp_path / "model"), "--init", "random", "--run", "r", "--swarm", SWARM,
         "--initial-peers", initial_peer, "--inner-steps", "4", "--seq-len", "16",
         "--batch-size", "2", "--corpus-bytes", "20000", "--matchmaking-seconds", "1",
         "--mqtt", broker.url, "--telemetry-period", "0.2"],
    )  # fmt: skip
    prefix = trainer.wait_for_line("joined run", timeout=120).split()[2]  # the id's first 12 characters

    def mine(key: str) -> bool:
        return key.startswith(prefix)

    def trained(feed) -> bool:
        peer = next((p for key, p in feed.peers.items() if mine(key)), None)
        return peer is not None and peer.trainer is not None and peer.trainer[1].inner_step > 0

    def check(feed):
        run, record = next(p.trainer for key, p in feed.peers.items() if mine(key))
        assert run == "r" and record.loss > 0

    asyncio.run(follow_until_offline(broker, trainer, trained, check, mine))


async def follow_until_offline(broker, process, ready, check, mine) -> None:
    """Follows the feed until ``ready(feed)``, runs ``check(feed)``, SIGTERMs ``process`` (exit 0)
    and waits for every peer whose id ``mine`` accepts to be marked offline."""
    feed = make_feed(broker.url)
    async with asyncio.TaskGroup() as tasks:
        reading = tasks.create_task(feed.run())
        await wait_until(lambda: ready(feed), timeout=60, what="the peer's telemetry")
        check(feed)
        assert process.terminate(timeout=60) == 0
        await wait_until(
            lambda: not any(p.online for key, p in feed.peers.items() if mine(key)),
            timeout=30,
            what="offline",
        )
        reading.cancel()

"""The health server over real HTTP on 127.0.0.1 (a fake DHT reader), and the daemons' /metrics component."""

from __future__ import annotations

import asyncio
import html
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from peers.health_server import HealthConfig, HealthService, SwarmViewConfig
from peers.metrics import MetricsConfig, MetricsServer
from swarm.health import SwarmView
from swarm.records import ModelRecord
from tests.harness import HOSTILE, MODEL, hostile_view, make_server, make_trainer, wait_until
from transport.errors import DeadlineExceeded

pytestmark = pytest.mark.timeout(60)


async def _serving(service: HealthService, check) -> None:
    """Serves ``service`` on a free port, runs ``check(session, base_url)``, then stops it."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    async with asyncio.TaskGroup() as group:
        server = group.create_task(service.serve(ready.set_result))
        try:
            url = await asyncio.wait_for(ready, 10)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                await check(session, url)
        finally:
            server.cancel()


def make_service(view_or_error, **config) -> HealthService:
    async def read_view() -> SwarmView:
        if isinstance(view_or_error, Exception):
            raise view_or_error
        return view_or_error

    config.setdefault("port", 0)
    return HealthService(HealthConfig(view=SwarmViewConfig(swarm="s"), **config), read_view)


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_page_api_state_fragment_and_metrics():
    view = SwarmView(
        "s",
        MODEL,
        {"a": make_server("a", 0, 2), "b": make_server("b", 2, 4)},
        {"demo": {"t": make_trainer(updated_at=time.time())}},
    )

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url) as response:
            assert response.status == 200 and response.content_type == "text/html"
            page = await response.text()
            assert 'class="coverage-chart"' in page and 'class="loss-chart"' in page
        async with session.get(url + "api/state") as response:
            state = await response.json()
        assert state["schema"] == 1 and state["swarm"] == "s"
        assert {server["peer_id"] for server in state["servers"]} == {"a", "b"}
        assert state["runs"][0]["name"] == "demo"
        async with session.get(url + "fragment") as response:
            assert 'id="servers"' in await response.text()
        async with session.get(url + "metrics") as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            samples = metric_samples(await response.text())
        assert samples[("swarm_blocks", (("swarm", "s"),))] == 4
        assert samples[("swarm_uncovered_blocks", (("swarm", "s"),))] == 0
        assert samples[("swarm_block_servers", (("block", "3"), ("swarm", "s")))] == 1
        assert samples[("swarm_health_verdict", (("swarm", "s"), ("verdict", "degraded")))] == 1
        assert samples[("swarm_run_round", (("run", "demo"), ("swarm", "s")))] == 3
        assert samples[("swarm_server_load", (("peer", "a"), ("swarm", "s")))] == 1

    asyncio.run(_serving(make_service(view), check))


def test_hostile_records_are_escaped_over_http():
    async def check(session: aiohttp.ClientSession, url: str) -> None:
        for path in ("", "fragment"):
            async with session.get(url + path) as response:
                assert response.status == 200
                text = await response.text()
                assert "<script>alert" not in text and "<img" not in text
                assert html.escape(HOSTILE) in text
                assert len(text) < 100_000
        async with session.get(url + "api/state") as response:
            assert len(await response.read()) < 50_000
        async with session.get(url + "metrics") as response:
            assert response.status == 200
            metric_samples(await response.text())  # still parses

    asyncio.run(_serving(make_service(hostile_view()), check))


def test_failed_dht_read_keeps_serving_and_raises_an_alert():
    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "api/state") as response:
            state = await response.json()
        assert state["verdict"] == "broken"
        assert "DeadlineExceeded" in state["sources"]["dht_error"]
        assert any(alert["kind"] == "dht_unreachable" for alert in state["alerts"])

    asyncio.run(_serving(make_service(DeadlineExceeded("DHT lookup did not finish within 1.0s")), check))


def test_refresher_picks_up_new_records():
    views = [SwarmView("s", MODEL, {"a": make_server("a", 0, 4)})]

    async def read_view() -> SwarmView:
        return views[-1]

    service = HealthService(
        HealthConfig(view=SwarmViewConfig(swarm="s"), port=0, refresh_interval=0.05), read_view
    )

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        views.append(SwarmView("s", ModelRecord("tiny", "abc", 4), {}))
        await wait_until(
            lambda: service.state["model"]["uncovered"],
            until=lambda uncovered: uncovered == [[0, 4]],
            timeout=10,
            what="the refresher to see blocks 0:4 uncovered",
        )

    asyncio.run(_serving(service, check))


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"port": 70000}, "--port"),
        ({"refresh_interval": 0}, "--refresh-interval"),
        ({"poll_interval": -1}, "--poll-interval"),
        ({"mqtt": "http://x"}, "--mqtt"),
    ],
)
def test_invalid_health_config_names_the_flag(changes, flag):
    with pytest.raises(ValueError, match=flag):
        HealthConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"request_timeout": 0}, "--request-timeout"),
        ({"min_redundancy": 0}, "--min-redundancy"),
        ({"stall_after": 0}, "--stall-after"),
    ],
)
def test_invalid_view_config_names_the_flag(changes, flag):
    with pytest.raises(ValueError, match=flag):
        SwarmViewConfig(**changes)


def test_metrics_server_serves_a_daemons_own_gauges():
    registry = CollectorRegistry()
    load = Gauge("swarm_server_load", "requests queued or running", registry=registry)

    async def main() -> None:
        async with MetricsServer(MetricsConfig(port=0), registry) as server:
            assert server.url.startswith("http://127.0.0.1:")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                load.set(3)
                async with session.get(server.url) as response:
                    assert metric_samples(await response.text())[("swarm_server_load", ())] == 3
                load.set(5)
                async with session.get(server.url) as response:
                    assert metric_samples(await response.text())[("swarm_server_load", ())] == 5
            port = server.port
        # Closed on exit: the port no longer answers.
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)

    asyncio.run(main())


def test_metrics_server_run_stops_on_cancel():
    async def main() -> None:
        server = MetricsServer(MetricsConfig(port=0), CollectorRegistry())
        async with asyncio.TaskGroup() as group:
            task = group.create_task(server.run())
            await wait_until(lambda: server.port is not None, timeout=10, what="the metrics server to bind")
            task.cancel()

    asyncio.run(main())


def test_invalid_metrics_config_names_the_flag():
    with pytest.raises(ValueError, match="--metrics-port"):
        MetricsConfig(port=-1)

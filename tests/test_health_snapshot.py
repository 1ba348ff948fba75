"""The health snapshot, page rendering and terminal summary, from parsed records (no network)."""

from __future__ import annotations

import html
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peers.health_page import render_fragment, render_page
from peers.status import format_summary
from swarm.health import MAX_BLOCKS, HealthThresholds, RunProgressTracker, SwarmView, build_health_state
from swarm.health_display import MAX_TEXT
from swarm.records import ModelRecord, PeerValue, ServerState, parse_server_listings
from swarm.spans import Span
from swarm.swarm_errors import MalformedRecord
from swarm.telemetry import PeerTelemetry, parse_telemetry_state
from swarm.training.progress import (
    parse_run_index,
    run_index_entry,
    run_index_key,
)
from tests.harness import HOSTILE, MODEL, NOW, hostile_view, make_server, make_trainer
from transport.errors import ConfigurationError

pytestmark = pytest.mark.timeout(60)


def build(view: SwarmView, **kwargs) -> dict:
    kwargs.setdefault("tracker", RunProgressTracker())
    return build_health_state(view, now=NOW, **kwargs)


def test_full_redundant_coverage_is_healthy():
    servers = {f"p{i}": make_server(f"p{i}", 0, 4) for i in range(2)}
    state = build(SwarmView("s", MODEL, servers))
    assert state["verdict"] == "healthy"
    assert state["model"]["verdict"] == "healthy"
    assert [block["servers"] for block in state["model"]["blocks"]] == [2, 2, 2, 2]
    assert state["model"]["blocks"][0]["throughput"] == 20.0
    assert state["alerts"] == []
    json.dumps(state)  # JSON-serializable


def test_single_server_per_block_is_degraded():
    servers = {"a": make_server("a", 0, 2), "b": make_server("b", 2, 4)}
    state = build(SwarmView("s", MODEL, servers))
    assert state["model"]["verdict"] == "degraded"
    assert "0..3" in state["model"]["reason"]
    assert state["verdict"] == "degraded"
    assert (
        build(SwarmView("s", MODEL, servers), thresholds=HealthThresholds(min_redundancy=1))["verdict"]
        == "healthy"
    )


def test_uncovered_blocks_break_the_model_and_raise_an_alert():
    servers = {"a": make_server("a", 0, 2), "b": make_server("b", 1, 4, state=ServerState.DRAINING)}
    state = build(SwarmView("s", MODEL, servers))
    assert state["model"]["verdict"] == "broken"
    assert state["model"]["uncovered"] == [[2, 4]]
    assert [block["covered"] for block in state["model"]["blocks"]] == [True, True, False, False]
    assert any(
        alert["kind"] == "uncovered_blocks" and "2..3" in alert["message"] for alert in state["alerts"]
    )
    assert state["verdict"] == "broken"


def test_no_model_is_broken():
    state = build(SwarmView("s"))
    assert state["model"] is None and state["verdict"] == "broken"
    assert state["alerts"][0]["kind"] == "no_model"


def test_stale_and_unparseable_versions_are_flagged():
    servers = {
        "a": make_server("a", 0, 4, version="0.2.0"),
        "b": make_server("b", 0, 4, version="0.1.9"),
        "c": make_server("c", 0, 4, version="<script>alert(1)</script>"),
    }
    state = build(SwarmView("s", MODEL, servers))
    stale = {server["peer_id"]: server["stale_version"] for server in state["servers"]}
    assert stale == {"a": False, "b": True, "c": True}
    assert any(alert["kind"] == "stale_version" and "0.2.0" in alert["message"] for alert in state["alerts"])


def test_run_summary_and_loss_curve():
    runs = {"demo": {"t1": make_trainer(3), "t2": make_trainer(3, loss=4.0, tokens_per_second=50.0)}}
    state = build(SwarmView("s", MODEL, {}, runs))
    (run,) = state["runs"]
    assert run["name"] == "demo" and run["round"] == 3 and run["members"] == 2
    assert run["tokens_per_second"] == 150.0 and run["bytes_per_round"] == 2000
    assert run["loss"] == 3.0
    assert run["loss_curve"] == [[0, 4.0], [1, 3.5], [2, 3.0], [3, 2.5]]
    assert not run["stalled"] and run["hashes_agree"]


def test_a_run_without_new_rounds_stalls():
    tracker = RunProgressTracker()
    thresholds = HealthThresholds(stall_after=60)
    view = SwarmView("s", MODEL, {}, {"demo": {"t1": make_trainer(3, updated_at=NOW + 100)}})
    assert not build_health_state(view, now=NOW, tracker=tracker, thresholds=thresholds)["runs"][0]["stalled"]
    state = build_health_state(view, now=NOW + 61, tracker=tracker, thresholds=thresholds)
    assert state["runs"][0]["stalled"]
    assert any(alert["kind"] == "stalled_run" for alert in state["alerts"])
    moved = SwarmView("s", MODEL, {}, {"demo": {"t1": make_trainer(4, updated_at=NOW + 100)}})
    assert not build_health_state(moved, now=NOW + 62, tracker=tracker, thresholds=thresholds)["runs"][0][
        "stalled"
    ]


def test_members_that_disagree_on_parameters_raise_an_alert():
    runs = {"demo": {"t1": make_trainer(3), "t2": make_trainer(3, parameters_hash="x" * 64)}}
    state = build(SwarmView("s", MODEL, {}, runs))
    assert not state["runs"][0]["hashes_agree"]
    assert any(alert["kind"] == "hash_mismatch" for alert in state["alerts"])


def test_run_index_round_trip_and_hostile_entries():
    entry = run_index_entry("s", "demo")
    assert entry == {run_index_key("s"): {"run": "demo"}}
    values = [
        {"run": "demo"},
        {"run": "<b>x</b>"},
        {"run": 5},
        "junk",
        None,
        {"run": "a" * 1000},
        {"run": "b2"},
    ]
    assert parse_run_index(values) == ["b2", "demo"]
    with pytest.raises(ConfigurationError):
        run_index_entry("s", "bad name")


def test_telemetry_overlays_live_fields_and_marks_offline_peers():
    servers = {"a": make_server("a", 0, 4), "b": make_server("b", 0, 4)}
    live = make_server("a", 0, 4, load=7, free_cache_tokens=5)
    telemetry = {"a": PeerTelemetry(online=True, server=live), "b": PeerTelemetry(online=False)}
    state = build(SwarmView("s", MODEL, servers), telemetry=telemetry)
    by_peer = {server["peer_id"]: server for server in state["servers"]}
    assert by_peer["a"]["load"] == 7 and by_peer["a"]["free_cache_tokens"] == 5
    assert by_peer["a"]["source"] == "dht+mqtt"
    assert by_peer["b"]["state"] == "offline"
    assert any(alert["kind"] == "peer_offline" for alert in state["alerts"])
    # Coverage counts online servers only: the offline one no longer covers anything.
    assert [block["servers"] for block in state["model"]["blocks"]] == [1, 1, 1, 1]


def test_parse_telemetry_state_accepts_records_and_rejects_junk():
    wire = {"kind": "server", "peer": "a", **make_server("a", 0, 4).to_wire()}
    wire["curve"] = wire["curve"].decode()
    server, trainer = parse_telemetry_state(wire)
    assert server is not None and server.span == Span(0, 4) and trainer is None
    trainer_wire = {"kind": "trainer", "run": "demo", **make_trainer().to_wire()}
    trainer_wire["curve"] = trainer_wire["curve"].decode()
    assert parse_telemetry_state(trainer_wire)[1][0] == "demo"
    for junk in (None, [], {"kind": "x"}, {"kind": "server"}, {"kind": "trainer", "run": "<x>"}):
        with pytest.raises(MalformedRecord):
            parse_telemetry_state(junk)


def test_hostile_strings_are_clipped_and_escaped_everywhere():
    state = build(hostile_view())
    encoded = json.dumps(state)
    assert len(encoded) < 50_000
    assert all(len(server["version"]) <= MAX_TEXT for server in state["servers"])
    page = render_page(state, poll_interval=1.0)
    for text in (page, render_fragment(state)):
        assert "<script>alert" not in text
        assert "<img" not in text
        assert html.escape(HOSTILE) in text
        assert len(text) < 100_000
    assert page.count("<script>") == 1  # only our own refresh script
    summary = format_summary(state)
    assert "\x1b" not in summary and len(summary) < 10_000


def test_huge_block_count_is_clipped():
    model = ModelRecord(model_id="m", config_hash="c", n_blocks=10**9)
    state = build(SwarmView("s", model, {"a": make_server("a", 0, 4)}, n_blocks_clipped=True))
    assert state["model"]["n_blocks"] == MAX_BLOCKS
    assert "more than" in state["model"]["reason"]


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=20,
)
server_like = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from(["online", "joining", "draining", "bogus"]) | wire_values,
        "span": st.lists(st.integers(-2, 6), max_size=3) | wire_values,
        "tput": st.floats() | wire_values,
        "irate": st.floats(),
        "cache": st.integers(-5, 10),
        "load": st.integers(-5, 10),
        "addrs": st.lists(st.text(max_size=5), max_size=2),
        "curve": st.binary(max_size=4),
        "ver": st.text(max_size=30),
        "rtts": st.dictionaries(st.text(max_size=5), st.floats(), max_size=2),
        "started": st.floats(),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.text(max_size=6), server_like | wire_values, max_size=3), max_size=4))
def test_arbitrary_dht_values_never_break_the_snapshot(listings):
    servers = parse_server_listings(
        {peer: PeerValue(value, NOW + 10) for peer, value in listing.items()} for listing in listings
    )
    state = build(SwarmView("s", MODEL, servers))
    json.dumps(state, allow_nan=False)
    render_page(state, poll_interval=1.0)
    format_summary(state)

"""The health snapshot at scale, from parsed records (no network): map bands, thin blocks,
history, run shares, the reader's caps and its verified-record cache, the terminal summary."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord

from peers.health_page import render_fragment, render_page
from peers.status import format_summary
from swarm.health import RunProgressTracker, SwarmView, build_health_state
from swarm.health_history import HealthHistory, HistoryConfig
from swarm.health_map import MAX_BANDS
from swarm.health_reader import MAX_RECORD_BYTES, MAX_SERVERS_PER_BLOCK, CachingRecordValidator, read_servers
from swarm.identity import Identity
from swarm.records import ModelRecord, PeerValue, ServerRecord, ServerState
from tests.harness import MODEL, NOW, make_bound_server, make_server, make_trainer
from tests.test_health_snapshot import build

pytestmark = pytest.mark.timeout(60)


def test_map_groups_servers_by_span_into_bands_with_marks():
    servers = {
        "a": make_server("a", 0, 2),
        "b": make_server("b", 0, 2, state=ServerState.DRAINING),
        "c": make_server("c", 2, 4),
    }
    marks = {"a": {"relayed": True, "reports": None}, "c": {"relayed": None, "reports": 3}}
    state = build(SwarmView("s", MODEL, servers, marks=marks))
    bands = state["map"]
    assert [band["span"] for band in bands] == [[0, 2], [2, 4]]
    assert bands[0]["servers"] == 2 and bands[0]["exact"] and bands[0]["cells"] == [2, 2]
    assert bands[0]["states"]["draining"] == 1 and bands[0]["relayed"] == 1 and bands[0]["reported"] == 0
    assert bands[1]["reported"] == 1
    by_peer = {server["peer_id"]: server for server in state["servers"]}
    assert (
        by_peer["a"]["relayed"] is True and by_peer["b"]["relayed"] is None and by_peer["c"]["reports"] == 3
    )
    assert {state["servers"][index]["peer_id"] for index in bands[0]["members"]} == {"a", "b"}


def test_many_distinct_spans_are_snapped_into_at_most_max_bands():
    model = ModelRecord("m", "c", 80)
    servers = {
        f"p{start}-{length}": make_server(f"p{start}-{length}", start, start + length)
        for start in range(0, 72)
        for length in (3, 5, 8)
    }
    state = build(SwarmView("s", model, servers))
    assert 1 < len(state["map"]) <= MAX_BANDS
    assert sum(band["servers"] for band in state["map"]) == len(servers)
    coarse = next(band for band in state["map"] if not band["exact"])
    assert len(coarse["cells"]) == coarse["span"][1] - coarse["span"][0]
    assert max(coarse["cells"]) <= coarse["servers"]


def test_coverage_summary_names_the_thinnest_blocks():
    model = ModelRecord("m", "c", 6)
    servers = {f"p{i}": make_server(f"p{i}", 0, 6) for i in range(4)}
    servers["thin"] = make_server("thin", 0, 3)  # blocks 0..2 get a fifth server
    servers.pop("p0")
    servers["p0"] = make_server("p0", 0, 4)  # blocks 4, 5 have 3 servers, block 3 has 4... then 5
    state = build(SwarmView("s", model, servers))
    coverage = state["coverage"]
    assert [item["index"] for item in coverage["thinnest"][:2]] == [4, 5]
    assert coverage["min_servers"] == 3 and coverage["max_servers"] == 5
    assert coverage["bottleneck_tokens_per_second"] == 30.0
    page = render_page(state, poll_interval=1.0)
    assert 'id="thinnest"' in page and "block 4</b>" in page
    assert [item["index"] for item in coverage["thinnest"] if item["thin"]] == [4, 5]
    assert page.count('class="block covered thinnest"') == 2
    even = build(SwarmView("s", model, {f"p{i}": make_server(f"p{i}", 0, 6) for i in range(3)}))
    assert not any(item["thin"] for item in even["coverage"]["thinnest"])
    assert "No block is below 75% of the median" in render_fragment(even)


def test_history_is_a_bounded_rolling_window():
    history = HealthHistory(HistoryConfig(window=100.0, max_points=10))
    view = SwarmView("s", MODEL, {"a": make_server("a", 0, 4)}, {"demo": {"t": make_trainer(3)}})
    tracker = RunProgressTracker()
    kept = [
        history.observe(build_health_state(view, now=NOW + t, tracker=tracker), NOW + t)
        for t in range(0, 400, 3)
    ]
    assert kept[:5] == [True, False, False, False, True]  # one sample per window / max_points seconds
    assert len(history) <= 10
    exported = history.to_json()
    assert exported["swarm"]["t"][-1] - exported["swarm"]["t"][0] <= 100.0
    assert exported["swarm"]["servers_online"][-1] == 1 and exported["swarm"]["coverage_min"][-1] == 1
    assert exported["runs"]["demo"]["loss"][-1] == 2.0 and exported["runs"]["demo"]["members"][-1] == 1
    state = build_health_state(view, now=NOW + 500, tracker=tracker, history=history)
    assert state["history"]["swarm"]["t"][-1] == NOW + 500
    page = render_page(state, poll_interval=1.0)
    assert 'data-series="servers_online"' in page and 'data-series="demo:loss"' in page
    with pytest.raises(ValueError, match="--history-window"):
        HistoryConfig(window=0)


def test_run_members_get_their_share_of_the_runs_tokens():
    runs = {
        "demo": {
            "t1": make_trainer(3, tokens_per_second=300.0),
            "t2": make_trainer(3, tokens_per_second=100.0),
        }
    }
    state = build(SwarmView("s", MODEL, {}, runs))
    shares = {peer["peer_id"]: peer["tokens_share"] for peer in state["runs"][0]["peers"]}
    assert shares == {"t1": 0.75, "t2": 0.25}
    assert "75.0%" in render_fragment(state)


def _peer_value(record: ServerRecord, **extra) -> PeerValue:
    return PeerValue({**record.to_wire(), **extra}, NOW + 10)


def test_reader_caps_records_per_block_and_record_size_and_reads_marks():
    identities = [Identity.generate() for _ in range(MAX_SERVERS_PER_BLOCK + 5)]
    p0, p1, p2, p3 = (identity.peer_id for identity in identities[:4])
    listing = {identity.peer_id: _peer_value(make_bound_server(identity, 0, 1)) for identity in identities}
    listing[p0] = _peer_value(make_bound_server(identities[0], 0, 1), relayed=True, reports=2)
    listing[p1] = _peer_value(make_bound_server(identities[1], 0, 1), relayed="yes", reports=-1)  # mistyped
    listing[p2] = _peer_value(make_bound_server(identities[2], 0, 1, device="x" * (MAX_RECORD_BYTES + 1)))
    # another peer's CURVE key: its clients would reach that peer, so the page leaves it out too
    listing[p3] = _peer_value(
        make_bound_server(identities[3], 0, 1, curve_public_key=identities[4].curve_public_key)
    )
    servers, marks, dropped = read_servers([listing])
    assert len(servers) == MAX_SERVERS_PER_BLOCK - 2 and dropped == 6
    assert p2 not in servers and p3 not in servers
    assert marks[p0] == {"relayed": True, "reports": 2}
    assert marks[p1] == {"relayed": None, "reports": None}
    state = build(SwarmView("s", ModelRecord("m", "c", 1), servers, marks=marks, dropped=dropped))
    assert state["limits"] == {"records_dropped": 6}
    assert "6 DHT records left out" in render_fragment(state)


def test_caching_validator_skips_only_records_it_already_accepted():

    identity = Identity.generate()
    signer = CachingRecordValidator(identity)
    reader = CachingRecordValidator(Identity.generate())
    subkey = msgpack.packb(identity.peer_id)
    unsigned = DHTRecord(b"key", subkey, msgpack.packb({"x": 1}), time.time() + 60)
    record = dataclasses.replace(unsigned, value=signer.sign_value(unsigned))
    calls = []
    original = reader._check  # where the signature is verified
    reader._check = lambda item: calls.append(item) or original(item)
    assert reader.validate(record) and reader.validate(record)
    assert len(calls) == 1  # the second read of the same record is not verified again
    forged = dataclasses.replace(record, expiration_time=record.expiration_time + 1)
    assert not reader.validate(forged) and not reader.validate(forged)
    assert len(calls) == 3  # refusals are not cached


def test_status_summarizes_a_large_swarm_by_band():
    model = ModelRecord("m", "c", 8)
    servers = {f"p{i}": make_server(f"p{i}", 0 if i % 2 else 4, 4 if i % 2 else 8) for i in range(100)}
    summary = format_summary(build(SwarmView("s", model, servers)))
    assert "blocks 0:4: 50 servers, 50 online" in summary and "blocks 4:8: 50 servers" in summary
    assert len(summary.splitlines()) < 20

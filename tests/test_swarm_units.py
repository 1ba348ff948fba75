"""Unit tests of the swarm layer that need no DHT: identity, records, selection, rebalancing, routing."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import stat

import numpy as np
import pytest
import zmq

from swarm import (
    BanList,
    Identity,
    InsecureKeyFile,
    InvalidSpan,
    MalformedRecord,
    ModelRecord,
    NoRouteError,
    RebalancePolicy,
    RoutingConfig,
    ServerRecord,
    ServerState,
    Span,
    ThroughputCache,
    choose_span,
    compute_coverage,
    find_route,
    load_or_create_identity,
    load_swarm_key,
    measure_compute_throughput,
    parse_span,
    plan_move,
)
from swarm.identity import curve_public_key_of
from swarm.records import PeerValue, key_binding_error, parse_server_listings
from tests import harness
from tests.harness import make_bound_server
from transport.errors import ConfigurationError, RetryableError

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# Routing weighs these against each test's overrides (e.g. load=50 against an inference_rate of 50).
make_server = functools.partial(
    harness.make_server, throughput=100.0, inference_rate=50.0, free_cache_tokens=10_000, load=0
)


# ---------------------------------------------------------------- identity


def test_identity_is_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "identity.pem"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert again.peer_id == first.peer_id
    assert again.curve_public_key == first.curve_public_key
    assert first.peer_id != Identity.generate().peer_id


def test_identity_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "identity.pem"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        load_or_create_identity(path)


def test_curve_keypair_is_derived_from_identity_and_valid_for_zmq(tmp_path):
    identity = load_or_create_identity(tmp_path / "id.pem")
    assert len(identity.curve_public_key) == 40
    assert zmq.curve_public(identity.curve_secret_key) == identity.curve_public_key
    assert identity.curve_keypair().public == identity.curve_public_key
    assert load_or_create_identity(tmp_path / "id.pem").curve_secret_key == identity.curve_secret_key


def test_swarm_key_file_checks(tmp_path):
    path = tmp_path / "swarm.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigurationError, match="at least 16"):
        load_swarm_key(path)
    path.write_bytes(b"0123456789abcdef0123\n")
    assert load_swarm_key(path) == b"0123456789abcdef0123"
    os.chmod(path, 0o640)
    with pytest.raises(InsecureKeyFile):
        load_swarm_key(path)


# ---------------------------------------------------------------- spans and records


def test_parse_span():
    assert parse_span("4:8") == Span(4, 8)
    assert parse_span(":3") == Span(0, 3)
    assert parse_span("78:", n_blocks=80) == Span(78, 80)
    for text, message in [
        ("4-8", "START:END"),
        ("a:b", "integers"),
        ("8:4", "START < END"),
        ("70:90", "only 80"),
    ]:
        with pytest.raises(InvalidSpan, match=message):
            parse_span(text, n_blocks=80)
    assert isinstance(InvalidSpan("x"), ConfigurationError)


def test_server_record_roundtrip_ignores_unknown_fields():
    record = make_server("peer-a", 2, 6, next_rtts={"peer-b": 0.01}, device="cpu", dtype="float32")
    wire = record.to_wire()
    wire["from_the_future"] = {"x": 1}
    assert ServerRecord.from_wire("peer-a", wire) == record


@pytest.mark.parametrize(
    "garbage",
    [None, 42, "text", b"\x00", [], {}, {"state": "online"}, {"state": "flying"}],
)
def test_malformed_server_records_raise(garbage):
    with pytest.raises(MalformedRecord):
        ServerRecord.from_wire("peer", garbage)


def test_malformed_fields_raise():
    wire = make_server("p", 0, 2).to_wire()
    for field, bad in [
        ("span", [3, 1]),
        ("span", [0, "2"]),
        ("tput", -1.0),
        ("tput", float("nan")),
        ("cache", True),
    ]:
        broken = dict(wire, **{field: bad})
        with pytest.raises(MalformedRecord):
            ServerRecord.from_wire("p", broken)
    with pytest.raises(MalformedRecord):
        ModelRecord.from_wire({"model": "m", "config": "c", "blocks": 0})


def test_listing_skips_garbage_and_prefers_latest():
    identity = Identity.generate()
    a = identity.peer_id
    old = make_bound_server(identity, 0, 2)
    new = make_bound_server(identity, 4, 6)
    listings = [
        {a: PeerValue(old.to_wire(), 10.0), "junk": PeerValue({"state": 1}, 10.0)},
        {a: PeerValue(new.to_wire(), 20.0), "gone": PeerValue(None, 30.0)},
    ]
    servers = parse_server_listings(listings)
    assert list(servers) == [a]
    assert servers[a].span == Span(4, 6)


def test_listing_skips_records_whose_curve_key_is_not_the_signers():
    """A record must name its signer's identity key, and carry that key's CURVE form (issue #14)."""
    owner, other = Identity.generate(), Identity.generate()
    assert (
        curve_public_key_of(owner.public_key)
        == owner.curve_public_key
        == zmq.curve_public(owner.curve_secret_key)
    )
    honest = make_bound_server(owner, 0, 2)
    cases = {
        "another peer's CURVE key": dataclasses.replace(honest, curve_public_key=other.curve_public_key),
        "another peer's identity key": dataclasses.replace(honest, identity_key=other.public_key),
        "no identity key": dataclasses.replace(honest, identity_key=b""),
        "a malformed identity key": dataclasses.replace(honest, identity_key=b"x" * 31),
    }
    for what, record in cases.items():
        assert key_binding_error(record) is not None, what
        assert parse_server_listings([{owner.peer_id: PeerValue(record.to_wire(), 10.0)}]) == {}, what
    assert key_binding_error(honest) is None
    assert ServerRecord.from_wire(owner.peer_id, honest.to_wire()) == honest
    assert list(parse_server_listings([{owner.peer_id: PeerValue(honest.to_wire(), 10.0)}])) == [
        owner.peer_id
    ]


# ---------------------------------------------------------------- selection and rebalancing


def test_coverage_and_lexicographic_choice():
    coverage = compute_coverage([0, 2], [4, 6], [1.0, 2.0], 8)
    np.testing.assert_allclose(coverage, [1, 1, 3, 3, 2, 2, 0, 0])
    assert choose_span(coverage, 2) == Span(6, 8)
    assert choose_span(coverage, 3) == Span(5, 8)
    assert choose_span(coverage, 100) == Span(0, 8)
    assert choose_span(np.zeros(8), 3) == Span(0, 3)


def test_heterogeneous_servers_get_sensible_spans():
    n_blocks = 24
    rng = random.Random(1)
    kinds = [(10.0, 12), (3.0, 6), (1.0, 3)]  # (throughput, blocks that fit): H100, 4090, 3060
    coverage = np.zeros(n_blocks)
    spans = []
    for index in range(30):
        throughput, max_blocks = kinds[index % 3]
        throughput *= rng.uniform(0.9, 1.1)
        span = choose_span(coverage, max_blocks)
        assert len(span) == max_blocks
        coverage[span.start : span.end] += throughput
        spans.append(span)
    bound = coverage.sum() / n_blocks  # throughput spread perfectly
    assert coverage.min() > 0
    assert coverage.min() >= 0.8 * bound


def test_rebalance_fills_a_hole_and_never_leaves_a_gap():
    policy = RebalancePolicy(min_gain=0.5)
    # Blocks 6..7 lost their servers; a server on 0..2 (covered twice) should move there.
    coverage = compute_coverage([0, 0, 2, 4], [2, 2, 6, 6], [1.0, 1.0, 1.0, 1.0], 8)
    assert plan_move(coverage, Span(0, 2), 1.0, 2, policy) == Span(6, 8)
    # The only server of blocks 2..5 must stay even though 6..7 is empty.
    only = compute_coverage([0, 2], [2, 6], [1.0, 1.0], 8)
    assert plan_move(only, Span(2, 6), 1.0, 2, policy) is None


def test_rebalance_does_not_oscillate():
    rng = random.Random(7)
    n_blocks = 32
    policy = RebalancePolicy(min_gain=0.5, min_relative_gain=0.0)
    servers = []
    coverage = np.zeros(n_blocks)
    for _ in range(40):
        throughput, max_blocks = rng.choice([(1.0, 4), (2.5, 8), (8.0, 16)])
        # Start badly: everyone piles onto the first blocks.
        span = Span(0, max_blocks)
        coverage[span.start : span.end] += throughput
        servers.append([span, throughput, max_blocks])
    moves_per_round = []
    for _ in range(60):
        moves = 0
        for server in rng.sample(servers, len(servers)):
            span, throughput, max_blocks = server
            target = plan_move(coverage, span, throughput, max_blocks, policy)
            if target is not None:
                coverage[span.start : span.end] -= throughput
                coverage[target.start : target.end] += throughput
                server[0] = target
                moves += 1
        moves_per_round.append(moves)
    assert sum(moves_per_round[:5]) > 0  # it did rebalance
    assert sum(moves_per_round[-30:]) == 0  # ...and then settled for good
    assert sum(moves_per_round) < 3 * len(servers)
    assert coverage.min() >= 0.6 * coverage.sum() / n_blocks


def test_rebalance_policy_validation():
    with pytest.raises(ConfigurationError, match="min-gain"):
        RebalancePolicy(min_gain=0)


# ---------------------------------------------------------------- routing and bans


def test_route_prefers_fast_chain_and_tiles_blocks():
    servers = [
        make_server("slow-all", 0, 8, inference_rate=5.0),
        make_server("fast-a", 0, 5, inference_rate=100.0),
        make_server("fast-b", 3, 8, inference_rate=100.0),
    ]
    route = find_route(servers, 0, 8, client_rtts={"fast-a": 0.01, "fast-b": 0.01})
    assert [hop.peer_id for hop in route] == ["fast-a", "fast-b"]
    assert [hop.span for hop in route] == [Span(0, 5), Span(5, 8)]


def test_route_penalises_load_and_missing_cache():
    servers = [make_server("busy", 0, 4, load=50), make_server("idle", 0, 4, inference_rate=20.0)]
    assert [h.peer_id for h in find_route(servers, 0, 4)] == ["idle"]
    servers = [
        make_server("full", 0, 4, free_cache_tokens=10),
        make_server("roomy", 0, 4, inference_rate=5.0),
    ]
    assert [h.peer_id for h in find_route(servers, 0, 4, session_tokens=512)] == ["roomy"]
    strict = RoutingConfig(exclude_without_cache=True)
    with pytest.raises(NoRouteError):
        find_route([make_server("full", 0, 4, free_cache_tokens=10)], 0, 4, session_tokens=512, config=strict)


def test_replacement_route_for_subspan_excludes_banned():
    servers = [make_server("a", 0, 8), make_server("b", 4, 8, inference_rate=200.0), make_server("c", 2, 6)]
    route = find_route(servers, 4, 8, excluded={"b"})
    assert route[0].span.start == 4 and route[-1].span.end == 8
    assert "b" not in {hop.peer_id for hop in route}


def test_no_route_names_uncovered_blocks():
    servers = [
        make_server("a", 0, 4),
        make_server("b", 8, 10),
        make_server("joining", 4, 8, state=ServerState.JOINING),
    ]
    with pytest.raises(NoRouteError, match=r"no server covers blocks 4\.\.7") as error:
        find_route(servers, 0, 10)
    assert error.value.uncovered == [(4, 8)]
    assert isinstance(error.value, RetryableError)
    with pytest.raises(NoRouteError, match=r"blocks 0\.\.7 \(1 online server\(s\) excluded"):
        find_route(servers, 0, 10, excluded={"a"})


def test_ban_list_backoff_with_fake_clock():
    clock = FakeClock()
    bans = BanList(base_seconds=15, factor=2, max_seconds=100, clock=clock)
    assert bans.ban("x") == 15
    assert bans.is_banned("x") and bans.banned() == {"x"}
    clock.now += 15.1
    assert not bans.is_banned("x")
    assert bans.ban("x") == 30
    clock.now += 31
    assert bans.ban("x") == 60
    clock.now += 61
    assert bans.ban("x") == 100  # capped
    clock.now += 100 + 101  # long quiet period: start over
    assert bans.ban("x") == 15
    bans.forgive("x")
    assert not bans.is_banned("x")


# ---------------------------------------------------------------- throughput


def test_throughput_measurement_and_cache(tmp_path):
    clock = FakeClock(0.0)

    def step():
        clock.now += 0.5

    assert measure_compute_throughput(step, tokens_per_step=10, steps=4, clock=clock) == pytest.approx(20.0)
    cache = ThroughputCache(tmp_path / "tput.json")
    calls = []
    key = "cpu|float32|abc"
    assert cache.get_or_measure(key, lambda: calls.append(1) or 42.0) == 42.0
    assert cache.get_or_measure(key, lambda: calls.append(1) or 7.0) == 42.0
    assert len(calls) == 1
    (tmp_path / "tput.json").write_text("not json")
    assert cache.get(key) is None

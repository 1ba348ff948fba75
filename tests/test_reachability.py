"""The reachability check on loopback: real endpoints dial back real (or dead) addresses."""

from __future__ import annotations

import asyncio
import socket

import pytest

from swarm.reachability import (
    Reachability,
    ReachabilityConfig,
    check_reachability,
    serve_dial_back,
    tcp_target,
)
from transport import ConfigurationError, Endpoint

pytestmark = pytest.mark.timeout(60)

FAST = ReachabilityConfig(dial_timeout=1.0, ask_timeout=5.0)


def _dead_port() -> int:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _checkers(count: int, stack):
    found = []
    for _ in range(count):
        checker = await stack.enter_async_context(Endpoint())
        serve_dial_back(checker, dial_timeout=1.0)
        found.append((await checker.bind("tcp://127.0.0.1:0"), checker.public_key))
    return found


def test_reachable_peer_is_direct_and_unreachable_one_is_relayed():
    async def body():
        import contextlib

        async with contextlib.AsyncExitStack() as stack:
            checkers = await _checkers(3, stack)
            dht = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
            stack.push_async_callback(dht.wait_closed)
            stack.callback(dht.close)
            dht_port = dht.sockets[0].getsockname()[1]
            peer = await stack.enter_async_context(Endpoint())
            data_address = await peer.bind("tcp://127.0.0.1:0")

            direct = await check_reachability(
                peer,
                checkers,
                dht_maddrs=[f"/ip4/127.0.0.1/tcp/{dht_port}"],
                data_address=data_address,
                public_key=peer.public_key,
                config=FAST,
            )
            assert direct.direct and (direct.asked, direct.confirmed) == (3, 3), direct

            dead = _dead_port()
            relayed = await check_reachability(
                peer,
                checkers,
                dht_maddrs=[f"/ip4/127.0.0.1/tcp/{dead}"],
                data_address=f"tcp://127.0.0.1:{dead}",
                public_key=peer.public_key,
                config=FAST,
            )
            assert not relayed.direct and (relayed.asked, relayed.confirmed) == (3, 0), relayed
            assert "relayed" in relayed.reason

            # the data plane answers, but with another key: not us, so not reachable
            impostor = await check_reachability(
                peer,
                checkers[:1],
                dht_maddrs=[f"/ip4/127.0.0.1/tcp/{dht_port}"],
                data_address=data_address,
                public_key=Endpoint().public_key,
                config=FAST,
            )
            assert not impostor.direct

    asyncio.run(asyncio.wait_for(body(), 50))


def test_first_peer_unanswered_checkers_and_overrides():
    async def body():
        async with Endpoint() as peer:
            address = await peer.bind("tcp://127.0.0.1:0")
            kwargs = dict(dht_maddrs=[], data_address=address, public_key=peer.public_key)
            first = await check_reachability(peer, [], config=FAST, **kwargs)
            assert first.direct and "nobody to ask" in first.reason
            gone = [(f"tcp://127.0.0.1:{_dead_port()}", Endpoint().public_key)]
            unanswered = await check_reachability(
                peer, gone, config=ReachabilityConfig(dial_timeout=0.5, ask_timeout=1.0), **kwargs
            )
            assert unanswered.direct and "none of 1 peers answered" in unanswered.reason
            forced = await check_reachability(peer, gone, config=ReachabilityConfig(mode="relayed"), **kwargs)
            assert not forced.direct and "--reachability relayed" in forced.reason

    asyncio.run(asyncio.wait_for(body(), 50))


def test_verdict_round_trips_and_config_is_validated():
    verdict = Reachability(False, "2 of 5 peers dialled us back: relayed", 5, 2)
    assert Reachability.from_wire(verdict.to_wire()) == verdict and verdict.mode == "relayed"
    for bad in (None, {"direct": 1}, {"direct": True, "asked": -1}, {"direct": True, "reason": 3}):
        with pytest.raises(ValueError):
            Reachability.from_wire(bad)
    with pytest.raises(ConfigurationError, match="--reachability"):
        ReachabilityConfig(mode="sometimes")
    assert tcp_target("/ip4/10.0.0.1/tcp/31337/p2p/Qm") == ("10.0.0.1", 31337)
    assert tcp_target("/ip4/10.0.0.1/tcp/1/p2p/R/p2p-circuit/p2p/T") is None
    assert tcp_target("/ip4/10.0.0.1/udp/1/quic") is None


# ---------------------------------------------------------------- records, balancing, routing

RELAYED = Reachability(False, "0 of 3 peers dialled us back: relayed", 3, 0)
P2P_ID = "12D3KooWGENeQmq8seeb4UPToMjANtThNaxpip7FyJ5JTLHPtt6c"


def _relayed_server(peer: str, start: int, end: int, **changes):
    from tests.harness import make_server

    return make_server(
        peer,
        start,
        end,
        reachability=RELAYED,
        libp2p_peer=P2P_ID,
        addresses=("tcp://192.168.1.2:5000", f"/p2p/{P2P_ID}"),
        **changes,
    )


def test_server_record_carries_reachability_and_libp2p_peer():
    from swarm import ServerRecord
    from swarm.records import PeerValue, parse_server_listings
    from tests.harness import make_server

    relayed = _relayed_server("a", 0, 4)
    parsed = ServerRecord.from_wire("a", relayed.to_wire())
    assert parsed == relayed and parsed.relayed
    old = make_server("b", 0, 4)  # a peer from before the check: no field, read as direct
    assert "reach" not in old.to_wire() and not ServerRecord.from_wire("b", old.to_wire()).relayed
    # relayed without a libp2p peer id cannot be dialled over libp2p: treated as direct
    assert not make_server("c", 0, 4, reachability=RELAYED).relayed
    broken = {**relayed.to_wire(), "reach": {"direct": "yes"}}
    assert parse_server_listings([{"a": PeerValue(broken, 1e12)}]) == {}  # malformed: skipped


def test_balancing_counts_relayed_servers_at_a_fraction_and_routes_prefer_direct():
    from swarm import choose_span, coverage_from_records, find_route
    from swarm.data_plane import direct_checkers
    from swarm.selection import RELAYED_THROUGHPUT_FACTOR
    from tests.harness import make_server

    direct = make_server("direct", 0, 4, throughput=10.0)
    relayed = _relayed_server("relayed", 4, 8, throughput=10.0)
    coverage = coverage_from_records([direct, relayed], 8)
    assert list(coverage) == [10.0] * 4 + [10.0 * RELAYED_THROUGHPUT_FACTOR] * 4
    assert choose_span(coverage, 4).start == 4  # a newcomer strengthens the relayed blocks first

    # both cover 0:8: the direct one wins the route...
    both = [make_server("direct", 0, 8), _relayed_server("relayed", 0, 8)]
    assert [hop.peer_id for hop in find_route(both, 0, 8)] == ["direct"]
    # ...but blocks only the relayed server holds are still served, by it
    route = find_route([make_server("direct", 0, 4), _relayed_server("relayed", 4, 8)], 0, 8)
    assert [hop.peer_id for hop in route] == ["direct", "relayed"]
    # only direct servers are asked to check a newcomer's reachability
    assert direct_checkers([direct, relayed], exclude="nobody") == [
        (direct.addresses[0], direct.curve_public_key)
    ]
    assert direct_checkers([direct], exclude="direct") == []


def test_health_state_and_page_say_which_servers_are_relayed():
    from peers.health_page import render_page
    from swarm.health import RunProgressTracker, SwarmView, build_health_state
    from tests.harness import MODEL, NOW, make_server

    direct = make_server(
        "d", 0, 4, reachability=Reachability(True, "3 of 3 peers dialled us back: direct", 3, 3)
    )
    servers = {"d": direct, "r": _relayed_server("r", 0, 4), "o": make_server("o", 0, 4)}
    state = build_health_state(SwarmView("s", MODEL, servers), now=NOW, tracker=RunProgressTracker())
    by_peer = {server["peer_id"]: server for server in state["servers"]}
    assert [by_peer[p]["reachability"] for p in "dro"] == ["direct", "relayed", "unknown"]
    assert "relayed" in by_peer["r"]["reachability_reason"]
    page = render_page(state, poll_interval=5.0)
    assert 'data-peer="r" data-state="online" data-reachability="relayed"' in page
    assert page.count("(relayed)</span>") == 1


def test_relayed_training_members_get_no_reducer_share_unless_all_are_relayed():
    import dataclasses

    from swarm.data_plane import direct_member_checkers
    from swarm.training.parts import split_parts
    from swarm.training.progress import TrainingPeerRecord
    from tests.harness import make_trainer

    parts = split_parts(1024, [100.0, 0.0, 100.0])
    assert parts[1][0] == parts[1][1] and parts[0][1] - parts[0][0] == 512  # the relayed one reduces nothing
    assert [end - start for start, end in split_parts(1024, [0.0, 0.0])] == [512, 512]  # nobody else: all do
    with pytest.raises(ValueError):
        split_parts(1024, [1.0, -1.0])

    relayed = dataclasses.replace(make_trainer(), reachability=RELAYED)
    assert TrainingPeerRecord.from_wire(relayed.to_wire()) == relayed
    direct = make_trainer()
    checkers = direct_member_checkers({"r": relayed, "d": direct, "me": direct}, exclude="me")
    assert checkers == [(direct.addresses[0], direct.curve_public_key)]


def test_a_relayed_member_joins_the_round_but_does_not_lead_it():
    from swarm.training.matchmaking import JoinGroup, Matchmaker
    from swarm.training.parts import split_parts
    from transport import MemoryEndpoint, MemoryNetwork

    async def body():
        network = MemoryNetwork()
        peers = ["a-relayed", "b-direct", "c-direct"]  # the relayed one has the smallest id
        endpoints = {peer: MemoryEndpoint(network) for peer in peers}
        addresses = {peer: await endpoint.bind() for peer, endpoint in endpoints.items()}
        live = {peer: (addresses[peer], endpoints[peer].public_key) for peer in peers}
        live["a-relayed"] = ("memory://behind-nat", live["a-relayed"][1])  # nobody can dial it

        async def live_members():
            return dict(live)

        makers = {
            peer: Matchmaker(endpoints[peer], live_members, window=5.0, relayed_members=lambda: {"a-relayed"})
            for peer in peers
        }
        joins = {  # each announces the address its record has (the relayed one's is undialable)
            peer: JoinGroup(
                0, peer, live[peer][0], endpoints[peer].public_key, 0.0 if "relayed" in peer else 1e8, "h"
            )
            for peer in peers
        }
        groups = await asyncio.gather(*(makers[peer].form_group(0, joins[peer]) for peer in peers))
        for endpoint in endpoints.values():
            await endpoint.close()
        return groups

    groups = asyncio.run(asyncio.wait_for(body(), 30))
    assert all(group is not None for group in groups)
    assert {tuple(m.peer_id for m in group.members) for group in groups} == {
        ("a-relayed", "b-direct", "c-direct")
    }
    parts = split_parts(4096, [m.bandwidth for m in groups[0].members])
    assert parts[0][0] == parts[0][1]  # no reducer share for the relayed member


def test_peer_plane_presents_libp2p_callers_by_their_records_curve_key_and_dials_both_planes():
    """A relayed member's plane: handlers on ZeroMQ and libp2p; a libp2p caller is shown by
    the CURVE key its record pairs with its peer id, a stranger by its bare peer id."""
    from swarm.data_plane import PeerPlane, RelayedPlane
    from tests.netns_roles import Echo, echo
    from transport import Endpoint, Libp2pEndpoint

    async def body():
        async with (
            Endpoint() as direct,
            Libp2pEndpoint() as relayed,
            Libp2pEndpoint() as member,
            Libp2pEndpoint() as stranger,
            Endpoint() as zmq_caller,
        ):
            address = await relayed.bind()
            await member.start()
            records = {bytes(member.public_key): b"curve-key-of-the-member-record-0000000000"}

            async def identify(peer: bytes) -> bytes | None:
                return records.get(peer)

            plane = PeerPlane(
                direct, dht=None, relayed=RelayedPlane(relayed, "", (address,)), identify=identify
            )
            plane.add_handler(Echo, echo)
            zmq_address = await direct.bind("tcp://127.0.0.1:0")
            for caller, expected in ((member, records[bytes(member.public_key)]), (stranger, None)):
                connection = await caller.connect(address, relayed.public_key)
                reply = await connection.call(Echo("hi"))
                assert reply.caller == (expected or caller.public_key)
            # and over ZeroMQ the caller's CURVE key, as before
            connection = await zmq_caller.connect(zmq_address, direct.public_key)
            assert (await connection.call(Echo("hi"))).caller == zmq_caller.public_key
            # the plane dials tcp:// over ZeroMQ and multiaddrs over libp2p (as the peer they name)
            assert (await (await plane.connect(zmq_address, direct.public_key)).call(Echo("z"))).text == "z"
            other = await member.bind()
            member.add_handler(Echo, echo)
            assert (await (await plane.connect(other, b"")).call(Echo("p"))).caller == relayed.public_key
            await plane.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_libp2p_caller_is_the_member_whose_record_alone_claims_its_peer_id():
    """``RunMembership.curve_key_of``: from the signed records; a peer id two records claim
    names no one (a member cannot take over another's calls); the record round-trips it."""
    from types import SimpleNamespace

    from swarm.training.membership import RunMembership
    from swarm.training.progress import TrainingPeerRecord
    from tests.harness import make_trainer

    honest = make_trainer(curve_public_key=b"h" * 40, libp2p_peer="12D3KooHonest")
    assert TrainingPeerRecord.from_wire(honest.to_wire()).libp2p_peer == "12D3KooHonest"
    records = {
        "honest": honest,
        "other": make_trainer(curve_public_key=b"o" * 40, libp2p_peer="12D3KooOther"),
    }

    async def listing(key):
        return {peer: SimpleNamespace(value=record.to_wire()) for peer, record in records.items()}

    dht = SimpleNamespace(swarm_name="s", peer_id="me", list=listing)

    async def body():
        membership = RunMembership(dht, "run", 30.0)
        assert await membership.curve_key_of(b"12D3KooHonest") == b"h" * 40
        assert await membership.curve_key_of(b"12D3KooStranger") is None
        records["thief"] = make_trainer(curve_public_key=b"t" * 40, libp2p_peer="12D3KooHonest")
        await membership.members()
        assert await membership.curve_key_of(b"12D3KooHonest") is None
        assert await membership.curve_key_of(b"12D3KooOther") == b"o" * 40

    asyncio.run(asyncio.wait_for(body(), 10))

"""The DHT node's NAT options: relay limits reach the p2p daemon; the data plane attaches to it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from swarm import DHTConfig, Identity, SwarmDHT
from swarm.relay import RelayLimits
from transport import ConfigurationError, Libp2pEndpoint, Message, RequestContext, message

pytestmark = pytest.mark.timeout(90)


@message("test.dht_relay.echo")
class Echo(Message):
    text: str


async def echo(request: Echo, context: RequestContext) -> Echo:
    return request


def _daemon_command_lines() -> list[list[str]]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"p2pd"):
                lines.append([arg.decode() for arg in argv if arg])
    return lines


def test_relay_limits_become_daemon_flags_and_are_validated():
    flags = RelayLimits(max_circuits=3, data_limit_bytes=2**20, time_limit=60).daemon_flags()
    assert flags["relayMaxCircuits"] == 3 and flags["relayDataLimit"] == 2**20
    assert flags["relayTimeLimit"] == "60s" and flags["relayService"] == 1
    with pytest.raises(ConfigurationError, match="relay-max-circuits"):
        RelayLimits(max_circuits=0)
    with pytest.raises(ConfigurationError, match="force_reachability"):
        DHTConfig(force_reachability="sometimes")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads daemon command lines from /proc")
def test_dht_daemon_runs_with_the_relay_limits_and_serves_the_data_plane():
    async def body():
        limits = RelayLimits(max_circuits=3, max_reservations=7, data_limit_bytes=2**24, time_limit=90)
        config = DHTConfig(swarm_name="relay", host_maddrs=("/ip4/127.0.0.1/tcp/0",), relay_limits=limits)
        async with SwarmDHT(Identity.generate(), config) as dht:
            daemon = await dht.daemon_listen_maddr()
            mine = [argv for argv in _daemon_command_lines() if f"-listen={daemon}" in argv]
            assert len(mine) == 1, _daemon_command_lines()
            assert {
                "-relayMaxCircuits=3",
                "-relayMaxReservations=7",
                "-relayDataLimit=16777216",
                "-relayTimeLimit=90s",
                "-relayService=1",
            } <= set(mine[0])
            # the data plane over the DHT's own daemon: same libp2p identity, no second daemon
            async with Libp2pEndpoint(daemon=daemon) as server, Libp2pEndpoint() as client:
                server.add_handler(Echo, echo)
                address = await server.bind()
                assert server.public_key.decode() == dht.libp2p_peer_id
                connection = await client.connect(address, server.public_key)
                assert (await connection.call(Echo("over the DHT's daemon"))).text == "over the DHT's daemon"

    asyncio.run(asyncio.wait_for(body(), 80))

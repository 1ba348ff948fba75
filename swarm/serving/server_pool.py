"""``ServerPool``: the servers a client can use, as one owner of listing, bans and connections.

Every ``InferenceSession`` of a ``RemoteModel`` shares the model's pool: a server that
failed one session is avoided by the others for the length of its ban, and one
connection per server address carries every session's streams. Relayed servers
(behind NAT) are dialled over libp2p through the DHT's daemon (``RelayedDialer``),
authenticated as the libp2p peer id in their signed record.
"""

from __future__ import annotations

from swarm import BanList, ServerRecord, SwarmDHT
from swarm.data_plane import RelayedDialer
from transport import Connection, Endpoint


class ServerPool:
    """The DHT's listing of a model's servers, the client's bans, and cached connections.

    Args:
        dht: a started ``SwarmDHT`` (client mode is enough).
        endpoint: the client's endpoint (closing it closes the connections).
        n_blocks: blocks of the model (the listing covers them all).
        bans: servers to avoid for a while after they failed.
        dht_timeout: seconds for one DHT lookup.
    """

    def __init__(self, dht: SwarmDHT, endpoint: Endpoint, n_blocks: int, bans: BanList, dht_timeout: float):
        self.dht = dht
        self.endpoint = endpoint
        self.n_blocks = n_blocks
        self.bans = bans
        self.dht_timeout = dht_timeout
        self._connections: dict[str, Connection] = {}
        self._relayed = RelayedDialer(dht, endpoint.swarm_key, endpoint.timeouts)

    async def list(self) -> dict[str, ServerRecord]:
        """The servers the DHT lists for the model's blocks, by peer id.

        Raises:
            SwarmError: the lookup failed or ran past ``dht_timeout``.
        """
        return await self.dht.list_servers(self.n_blocks, timeout=self.dht_timeout)

    async def connection_to(self, server: ServerRecord) -> Connection:
        """A (cached) connection to ``server``: its first address, or libp2p when it is relayed."""
        address = f"/p2p/{server.libp2p_peer}" if server.relayed else server.addresses[0]
        connection = self._connections.get(address)
        if connection is None or getattr(connection, "broken", False):  # libp2p does not reconnect
            if server.relayed:
                connection = await self._relayed.connect(server)
            else:
                connection = await self.endpoint.connect(address, server.curve_public_key)
            self._connections[address] = connection
        return connection

    async def close(self) -> None:
        """Closes the libp2p side (the ZeroMQ connections close with the client's endpoint)."""
        await self._relayed.close()

    def ban(self, peer_id: str) -> None:
        """Avoids ``peer_id`` for a while (longer on each repeated failure)."""
        self.bans.ban(peer_id)

    def banned(self) -> frozenset[str]:
        """Peer ids avoided now."""
        return self.bans.banned()

"""``ServerPool``: the servers a client can use, as one owner of listing, bans and connections.

Every ``InferenceSession`` of a ``RemoteModel`` shares the model's pool: a server that
failed one session is avoided by the others for the length of its ban, and one
connection per server address carries every session's streams.
"""

from __future__ import annotations

from swarm import BanList, ServerRecord, SwarmDHT
from transport import Connection, Endpoint


class ServerPool:
    """The DHT's listing of a model's servers, the client's bans, and cached connections.

    Args:
        dht: a started ``SwarmDHT`` (client mode is enough).
        endpoint: the client's endpoint (closing it closes the connections).
        n_blocks: blocks of the model (the listing covers them all).
        bans: servers to avoid for a while after they failed.
        dht_timeout: seconds for one DHT lookup.
        config_hash: the client's model config hash, sent with each session it opens so that
            a server of another model refuses it ("" sends none).
    """

    def __init__(self, dht: SwarmDHT, endpoint: Endpoint, n_blocks: int, bans: BanList, dht_timeout: float,
                 config_hash: str = ""):  # fmt: skip
        self.dht = dht
        self.endpoint = endpoint
        self.n_blocks = n_blocks
        self.config_hash = config_hash
        self.bans = bans
        self.dht_timeout = dht_timeout
        self._connections: dict[str, Connection] = {}

    async def list(self) -> dict[str, ServerRecord]:
        """The servers the DHT lists for the model's blocks, by peer id.

        Raises:
            SwarmError: the lookup failed or ran past ``dht_timeout``.
        """
        return await self.dht.list_servers(self.n_blocks, timeout=self.dht_timeout)

    async def connection_to(self, server: ServerRecord) -> Connection:
        """A (cached) connection to ``server``'s first address."""
        address = server.addresses[0]
        connection = self._connections.get(address)
        if connection is None:
            connection = await self.endpoint.connect(address, server.curve_public_key)
            self._connections[address] = connection
        return connection

    def ban(self, peer_id: str) -> None:
        """Avoids ``peer_id`` for a while (longer on each repeated failure)."""
        self.bans.ban(peer_id)

    def banned(self) -> frozenset[str]:
        """Peer ids avoided now."""
        return self.bans.banned()

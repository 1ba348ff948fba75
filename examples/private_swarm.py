"""A private swarm: only peers holding the swarm key can join, read its records or call its servers.

    python examples/private_swarm.py            # self-contained: makes a tiny model and a key

It writes a tiny model and a 32-byte key (mode 0600), starts one `swarm join` server
with `--swarm-key`, generates through it as a member, then shows that a client without
the key finds no servers (it cannot read the sealed records) and that one calling the
server directly is refused. In a real swarm, copy the key file to every member and pass
`--swarm-key FILE` to `swarm join`, `swarm train`, `swarm health` and `swarm generate`.
"""

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from kernels.tiny import write_tiny_checkpoint
from peers.processes import ProcessGroup
from swarm.serving import ClientConfig, RemoteModel
from swarm.swarm_errors import NoRouteError
from transport import Endpoint, NotAuthorized, Ping


def make_key(path: Path) -> bytes:
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return path.read_bytes()


async def use_swarm(model: Path, initial: str, key: bytes, server_address: str, server_key: bytes) -> None:
    async with RemoteModel.connect(model, [initial], swarm="private", swarm_key=key) as member:
        print("member generates:", repr(await member.generate("def ", max_new_tokens=8)))

    quick = ClientConfig(route_wait=3.0)
    async with RemoteModel.connect(model, [initial], swarm="private", config=quick) as outsider:
        try:
            await outsider.generate("def ", max_new_tokens=8)
        except NoRouteError as error:
            print(f"outsider without the key sees no servers: {error}")

    async with Endpoint() as stranger:  # knows the server's address and key, but not the swarm key
        try:
            connection = await stranger.connect(server_address, server_key)
            await connection.call(Ping(), timeout=5)
        except NotAuthorized as error:
            print(f"outsider calling the server directly is refused: {error}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="swarm-private-"))
    write_tiny_checkpoint(work / "model", num_layers=2, hidden_size=64)
    key_file = work / "swarm.key"
    key = make_key(key_file)
    group = ProcessGroup(work)
    try:
        server = group.start(
            "server",
            ["join", "--model", str(work / "model"), "--blocks", "0:2", "--swarm", "private",
             "--swarm-key", str(key_file), "--identity", str(work / "server.pem")],
        )  # fmt: skip
        initial = server.wait_for_line("initial peer for others", timeout=120).split()[-1]
        online = server.wait_for_line("ONLINE", timeout=120).split()
        address = online[online.index("at") + 1]
        from swarm.identity import load_or_create_identity

        server_key = load_or_create_identity(work / "server.pem").curve_public_key
        asyncio.run(use_swarm(work / "model", initial, key, address, server_key))
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

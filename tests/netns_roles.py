"""Roles that NAT tests run inside network namespaces (``python -m tests.netns_roles ROLE ...``).

Each role prints ``READY <json>`` once it is up, then lines the test reads, and runs
until killed (the ``NatLab`` kills it) or, for one-shot roles, exits with its result:

- ``relay --count N``: N reachable libp2p peers (relays for others).
- ``echo-server --relay MADDR,...``: a libp2p data-plane endpoint behind NAT that takes a
  reservation on the relays; READY once it serves (a dial through a relay confirms the
  reservation: p2pd does not list relay addresses).
- ``echo-client --address A --key K``: connects (retrying for ``--timeout`` seconds),
  calls Echo with a tensor, prints ``REPLY <json>`` with the attempts it took (or ``ERROR <json>``).
- ``checker``: a ZeroMQ endpoint that answers reachability questions.
- ``generate --checkpoint DIR --initial-peer MADDR``: greedy tokens through the swarm,
  compared with local generation: ``TOKENS <json>``.
- ``check --checker 'ADDRESS|KEY' ...``: runs the reachability check for a ZeroMQ
  endpoint and a DHT-like TCP listener of its own, prints ``VERDICT <json>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time

import torch

from transport import Endpoint, Libp2pEndpoint, Message, PeerUnavailable, RequestContext, message


@message("test.netns.echo")
class Echo(Message):
    text: str
    tensor: torch.Tensor | None = None
    caller: bytes = b""


async def echo(request: Echo, context: RequestContext) -> Echo:
    return Echo(request.text, request.tensor, context.peer_key or b"")


def _say(tag: str, value: object) -> None:
    print(f"{tag} {json.dumps(value)}", flush=True)


async def _forever() -> None:
    await asyncio.Event().wait()


async def relay(args: argparse.Namespace) -> None:
    # go-libp2p runs the relay service only on peers that consider themselves public.
    # Several relays: a peer behind NAT reserves a slot at once when it knows 4 candidates
    # (go-libp2p autorelay's minimum); with fewer it waits its 3-minute boot delay.
    options = {"host_maddrs": [f"/ip4/{args.host}/tcp/0"], "use_relay": True, "force_reachability": "public"}
    async with contextlib.AsyncExitStack() as stack:
        maddrs = []
        for _ in range(args.count):
            endpoint = await stack.enter_async_context(Libp2pEndpoint(daemon_options=options))
            await endpoint.start()
            maddrs += [str(m) for m in await endpoint.p2p.get_visible_maddrs(latest=True)]
        _say("READY", {"maddrs": maddrs})
        await _forever()


async def echo_server(args: argparse.Namespace) -> None:
    options = {
        "host_maddrs": ["/ip4/0.0.0.0/tcp/0"],
        "initial_peers": args.relay.split(","),
        "trusted_relays": args.relay.split(","),
        "use_relay": True,
        "use_auto_relay": True,
        "force_reachability": "private",
    }
    async with Libp2pEndpoint(daemon_options=options) as endpoint:
        endpoint.add_handler(Echo, echo)
        address = await endpoint.bind()
        # p2pd does not list its relay addresses among its visible ones (none showed in 90 s
        # while circuits through its reservation worked): only a dial through a relay tells
        # whether the reservation is held, so the test confirms it with a small echo first
        _say("READY", {"all": address, "peer": endpoint.public_key.decode()})
        await _forever()


async def echo_client(args: argparse.Namespace) -> None:
    async with Libp2pEndpoint(daemon_options={"host_maddrs": ["/ip4/0.0.0.0/tcp/0"]}) as endpoint:
        try:
            deadline = time.monotonic() + args.timeout
            tensor = torch.arange(args.elements, dtype=torch.float32)
            # The server may not hold its relay reservation yet, and a circuit through a relay
            # that holds none for it ends: redial and retry, bounded (as a swarm client fails over).
            attempts = 0
            while True:
                attempts += 1
                try:
                    connection = await endpoint.connect(args.address, args.key.encode())
                    reply = await connection.call(Echo("through the relay", tensor))
                    break
                except PeerUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
            _say(
                "REPLY",
                {
                    "text": reply.text,
                    "equal": bool(torch.equal(reply.tensor, tensor)),
                    "caller_ok": reply.caller == endpoint.public_key,
                    "attempts": attempts,
                },
            )
        except Exception as error:  # the test reads the failure
            _say("ERROR", {"kind": type(error).__name__, "message": str(error)[-600:]})


async def checker(args: argparse.Namespace) -> None:
    from swarm.reachability import serve_dial_back

    async with Endpoint() as endpoint:
        serve_dial_back(endpoint, dial_timeout=3.0)
        address = await endpoint.bind(f"tcp://{args.host}:0")
        _say("READY", {"address": address, "key": endpoint.public_key.decode()})
        await _forever()


async def check(args: argparse.Namespace) -> None:
    from swarm.reachability import ReachabilityConfig, check_reachability

    async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(ignore, "0.0.0.0", 0)  # stands in for the DHT's port
    dht_port = listener.sockets[0].getsockname()[1]
    async with Endpoint() as endpoint:
        bound = await endpoint.bind("tcp://0.0.0.0:0")
        port = bound.rsplit(":", 1)[1]
        # "|" is neither in a tcp:// address nor in z85 (whose alphabet has "@")
        checkers = [(c.split("|", 1)[0], c.split("|", 1)[1].encode()) for c in args.checker]
        verdict = await check_reachability(
            endpoint,
            checkers,
            dht_maddrs=[f"/ip4/{args.announce}/tcp/{dht_port}"],
            data_address=f"tcp://{args.announce}:{port}",
            public_key=endpoint.public_key,
            config=ReachabilityConfig(dial_timeout=3.0, ask_timeout=30.0),
        )
        _say("VERDICT", verdict.to_wire())
    listener.close()


async def generate_role(args: argparse.Namespace) -> None:
    """Greedy generation through the swarm, compared with local generation of the same checkpoint."""
    from kernels import generate, load_local_model
    from swarm.serving import ClientConfig, RemoteModel

    prompt = torch.tensor([[1, 17, 42, 99, 7, 300]])
    local = generate(load_local_model(args.checkpoint), prompt, args.tokens)
    config = ClientConfig(route_wait=20.0, route_poll=1.0, step_timeout=20.0, open_timeout=20.0)
    async with await RemoteModel.connect(args.checkpoint, args.initial_peer, config=config) as model:
        deadline = time.monotonic() + args.timeout
        while True:  # until the DHT lists every server (bounded)
            servers = await model.list_servers()
            if len(servers) >= args.servers or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        relayed = sorted(peer for peer, server in servers.items() if server.relayed)
        _say("LISTED", {"servers": len(servers), "relayed": relayed})
        started = time.monotonic()
        try:
            if args.pause_after:  # stream; after that many tokens, wait for a line on stdin
                pieces = []
                async for piece in model.stream(prompt, args.tokens):
                    pieces.append(piece)
                    if len(pieces) == args.pause_after:
                        paths = [  # the pool's connection cache is keyed by (address, key)
                            "libp2p" if address.startswith("/p2p/") else "zmq"
                            for address, _ in model.servers._connections
                        ]
                        _say("PAUSED", {"tokens": len(pieces), "paths": paths})
                        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                        started = time.monotonic()
                output = torch.cat([prompt, *pieces], dim=1)
            else:
                output = await model.generate(prompt, args.tokens)
        except Exception as error:  # the test reads the failure
            _say(
                "ERROR",
                {
                    "kind": type(error).__name__,
                    "message": str(error)[-600:],
                    "seconds": time.monotonic() - started,
                },
            )
            return
        _say("TOKENS", {"equal": bool(torch.equal(output, local)), "tokens": output[0].tolist()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--relay")
    parser.add_argument("--address")
    parser.add_argument("--key")
    parser.add_argument("--announce")
    parser.add_argument("--checker", action="append", default=[])
    parser.add_argument("--elements", type=int, default=1000)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--checkpoint")
    parser.add_argument("--initial-peer", action="append", default=[])
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    roles = {
        "relay": relay,
        "echo-server": echo_server,
        "echo-client": echo_client,
        "checker": checker,
        "check": check,
        "generate": generate_role,
    }
    asyncio.run(roles[args.role](args))
    sys.exit(0)


if __name__ == "__main__":
    main()

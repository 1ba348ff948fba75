"""`swarm join`: serve a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import asyncio
import logging

from peers.options import (
    PeerOptions,
    add_config_arguments,
    config_from_arguments,
    configure_logging,
    data_plane_address,
    install_stop_handlers,
    run_async,
    start_peer,
)

logger = logging.getLogger("swarm.join")

DESCRIPTION = """\
Serve a span of a model's transformer blocks to inference clients. With --blocks auto
the server measures its throughput (cached), reads which blocks the swarm covers
least and takes those, bounded by memory, and moves when other blocks need it more
(checked every --rebalance-period seconds on average). It prints the multiaddress others can pass
as --initial-peers, then a line starting with "ONLINE" once it serves.

Start a swarm:  swarm join --model CHECKPOINT_DIR --blocks 0:8
Join it:        swarm join --model CHECKPOINT_DIR --initial-peers MULTIADDR
Ctrl-C / SIGTERM drains: new sessions are refused, open ones get --drain-timeout
seconds to finish, records are withdrawn, exit 0 (twice to leave at once)."""


def register(subparsers) -> None:
    from peers.server_config import ServerConfig

    parser = subparsers.add_parser(
        "join",
        help="serve a span of a model's blocks for inference",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, ServerConfig)
    add_config_arguments(parser.add_argument_group("swarm"), PeerOptions)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from peers.server_config import ServerConfig

    configure_logging(args.verbose)
    try:
        config = config_from_arguments(ServerConfig, args)
        options = config_from_arguments(PeerOptions, args)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    return run_async(lambda: _join(config, options))


async def _join(config, options: PeerOptions) -> int:
    from peers.cli import software_version
    from peers.server import InferenceServer, serve
    from transport import Endpoint, Timeouts
    from transport.errors import SwarmError

    stop = asyncio.Event()
    install_stop_handlers(stop, asyncio.get_running_loop())
    try:
        identity, dht, swarm_key = await asyncio.to_thread(start_peer, options, config.record_ttl)
    except SwarmError as error:
        logger.error("could not join the swarm: %s", error)
        return 1
    timeouts = Timeouts(stream_idle=config.session_idle_timeout, request=max(60.0, config.push_wait * 2))
    try:
        async with Endpoint(identity.curve_keypair(), swarm_key=swarm_key, timeouts=timeouts) as endpoint:
            bound = await endpoint.bind(f"tcp://{options.host}:{options.port}")
            address = data_plane_address(options, bound)
            for maddr in dht.visible_maddrs():
                print(f"initial peer for others: {maddr}", flush=True)
            server = InferenceServer(config, dht, endpoint, address, software_version())

            def online(server: InferenceServer) -> None:
                print(f"ONLINE serving blocks {server.span} at {address} as {dht.peer_id}", flush=True)

            await serve(server, stop, online)
    except (SwarmError, ValueError, OSError) as error:
        logger.error("server failed: %s", error)
        return 1
    finally:
        await asyncio.to_thread(dht.shutdown)
    logger.info("left the swarm")
    return 0

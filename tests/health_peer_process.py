"""A stand-in peer for the health tests: a real DHT node that announces records until killed.

    python tests/health_peer_process.py server --span 0:2 --blocks 4 [--initial-peers MADDR]
    python tests/health_peer_process.py trainer --run demo [--initial-peers MADDR]

Prints ``READY <multiaddr> <peer id>`` once its first announcement is stored. Records use a
short lifetime (``--ttl``) and refresh (``--period``), so a killed process vanishes quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from hivemind.utils import get_dht_time

from swarm.announcer import Announcer
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.records import ModelRecord, ServerRecord, ServerState, model_key, server_record_entries
from swarm.spans import parse_span
from swarm.training.progress import TrainerState, TrainingPeerRecord, run_index_entry, run_key


def _server_records(args: argparse.Namespace, identity: Identity, started: float) -> dict:
    span = parse_span(args.span, args.blocks)
    record = ServerRecord(
        peer_id=identity.peer_id,
        state=ServerState.ONLINE,
        span=span,
        throughput=100.0 * len(span),
        inference_rate=20.0,
        free_cache_tokens=8192,
        load=0,
        addresses=("tcp://127.0.0.1:1",),
        curve_public_key=identity.curve_public_key,
        version=args.version,
        device="cpu",
        dtype="float32",
        started_at=started,
    )
    model = ModelRecord(model_id="tiny-llama", config_hash="abc123", n_blocks=args.blocks)
    return {model_key(args.swarm): model.to_wire(), **server_record_entries(args.swarm, record)}


def _trainer_records(args: argparse.Namespace, identity: Identity, started: float) -> dict:
    round_ = 10 + int(time.monotonic() - started)  # one new round per second: a live, progressing run
    history = tuple((r, 4.0 / (1 + 0.3 * r)) for r in range(round_ + 1))
    record = TrainingPeerRecord(
        state=TrainerState.TRAINING,
        round=round_,
        inner_step=round_ * 100,
        loss=history[-1][1],
        loss_history=history,
        tokens_per_second=1234.0,
        bytes_last_round=2_000_000,
        members_last_round=1,
        parameters_hash="0" * 64,
        addresses=("tcp://127.0.0.1:1",),
        curve_public_key=identity.curve_public_key,
        bandwidth=1e7,
        version=args.version,
        updated_at=get_dht_time(),
    )
    return {run_key(args.swarm, args.run): record.to_wire(), **run_index_entry(args.swarm, args.run)}


async def main(args: argparse.Namespace) -> None:
    identity = Identity.generate()
    config = DHTConfig(
        swarm_name=args.swarm,
        initial_peers=tuple(args.initial_peers),
        host_maddrs=("/ip4/127.0.0.1/tcp/0",),
        record_ttl=args.ttl,
        start_timeout=30.0,
        request_timeout=5.0,
    )
    started_wall, started_monotonic = get_dht_time(), time.monotonic()
    async with SwarmDHT(identity, config) as dht:
        if args.role == "server":

            def produce() -> dict:
                return _server_records(args, identity, started_wall)
        else:

            def produce() -> dict:
                return _trainer_records(args, identity, started_monotonic)

        announcer = Announcer(dht, produce, period=args.period, ttl=args.ttl)
        await announcer.announce_once()
        print(f"READY {dht.visible_maddrs()[0]} {identity.peer_id}", flush=True)
        await announcer.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "trainer"])
    parser.add_argument("--swarm", default="healthtest")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--span", default="0:2")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--run", default="demo")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--period", type=float, default=1.0)
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)

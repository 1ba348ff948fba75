"""A stand-in peer for the health tests: a real DHT node that announces records until killed.

    python tests/health_peer_process.py server --span 0:2 --blocks 4 [--initial-peers MADDR]
    python tests/health_peer_process.py trainer --run demo [--initial-peers MADDR]
    python tests/health_peer_process.py crowd --count 500 --first 0 --blocks 80 --manifest m.json

Prints ``READY <multiaddr> <peer id>`` once its first announcement is stored. Records use a
short lifetime (``--ttl``) and refresh (``--period``), so a killed process vanishes quickly.

``crowd`` is many servers in one process (the health page at scale, ``benchmarks/health_scale.py``):
``tests.health_crowd`` lays them out, each record is signed by its own identity, and the
manifest lists who is where. Its READY line names the first of them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sys
import time
from pathlib import Path

import hivemind
import msgpack
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm.announcer import Announcer
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.records import ModelRecord, ServerRecord, ServerState, model_key, server_record_entries
from swarm.signing import SwarmRecordValidator
from swarm.spans import Span, parse_span
from swarm.telemetry import encode_message, parse_mqtt_url
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
        identity_key=identity.public_key,
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


CROWD_SPAN_LENGTHS = (6, 8, 8, 10, 12, 16, 20)
"""Blocks per server in the crowd: a few hardware classes, as in a public swarm."""


def crowd_layout(count: int, first: int, blocks: int, thin: Span | None, seed: int) -> list[tuple[Span, str]]:
    """Where the crowd's servers ``first .. first + count - 1`` sit, and their states.

    Most servers take the least-covered range of their length, like the real block
    selection, avoiding ``thin`` (a deliberately weak spot); one in ten starts at random,
    so ``thin`` is covered, but thinly. One in twenty drains, one in thirty-three joins,
    one in fifty is reported offline over MQTT (``--mqtt``).
    """
    rng = random.Random(seed * 1_000_003 + first)
    coverage = [0] * blocks
    layout = []
    for index in range(first, first + count):
        length = min(blocks, rng.choice(CROWD_SPAN_LENGTHS))
        starts = range(blocks - length + 1)
        if index % 10 == 9:
            start = rng.choice(starts)
        else:

            def cost(start: int, length: int = length) -> float:
                hits_thin = thin is not None and start < thin.end and thin.start < start + length
                return sum(coverage[start : start + length]) + (1e9 if hits_thin else 0) + rng.random()

            start = min(starts, key=cost)
        for block in range(start, start + length):
            coverage[block] += 1
        state = "draining" if index % 20 == 7 else "joining" if index % 33 == 5 else "online"
        if index % 50 == 3:
            state = "offline"
        layout.append((Span(start, start + length), state))
    return layout


class _CrowdSigner(SwarmRecordValidator):
    """Signs each record with the identity its subkey names (one validator, many peers)."""

    def __init__(self, identities: list[Identity], ttl: float):
        super().__init__(identities[0], max_ttl=ttl)
        self._signers = {
            identity.peer_id: SwarmRecordValidator(identity, max_ttl=ttl) for identity in identities
        }

    def sign_value(self, record: DHTRecord) -> bytes:
        return self._signers[msgpack.unpackb(record.subkey, raw=False)].sign_value(record)


_STORE_BATCH = 48
"""Records per call into hivemind's DHT process."""


async def _store_batch(_dht, node, keys, values, expiration, subkeys):
    results = await node.store_many(keys, values, expiration, subkeys=subkeys)
    return sum(bool(ok) for ok in results.values())


async def _publish_offline(url: str, swarm: str, peers: list[Identity]) -> None:
    import aiomqtt

    endpoint = parse_mqtt_url(url)
    async with asyncio.timeout(30), aiomqtt.Client(endpoint.host, endpoint.port) as client:
        for peer in peers:
            message = encode_message(
                swarm, peer, online=False, state=None, sent_at=time.time(), session="crowd"
            )
            await client.publish(endpoint.topic(swarm, peer.peer_id), message, qos=1, retain=True)


async def run_crowd(args: argparse.Namespace) -> None:
    """Announces ``--count`` servers, each under its own identity, until killed."""
    thin = parse_span(args.thin, args.blocks) if args.thin else None
    layout = crowd_layout(args.count, args.first, args.blocks, thin, args.seed)
    identities = [Identity.generate() for _ in layout]
    started = get_dht_time()
    keys, values, subkeys = [], [], []
    model = ModelRecord(model_id="crowd-llama", config_hash="c0ffee", n_blocks=args.blocks)
    keys.append(model_key(args.swarm))
    values.append(model.to_wire())
    subkeys.append(identities[0].peer_id)
    for index, (identity, (span, state)) in enumerate(zip(identities, layout, strict=True)):
        record = ServerRecord(
            peer_id=identity.peer_id,
            state=ServerState.ONLINE if state == "offline" else ServerState(state),
            span=span,
            throughput=50.0 + 10.0 * (index % 16),
            inference_rate=10.0 + index % 7,
            free_cache_tokens=4096 * (1 + index % 4),
            load=index % 5,
            addresses=(f"tcp://10.{index // 250}.{index % 250}.1:31337",),
            curve_public_key=identity.curve_public_key,
            identity_key=identity.public_key,
            version=args.version if index % 40 != 11 else "0.0.9",
            device="cuda:NVIDIA A100" if index % 3 else "cuda:NVIDIA RTX 4090",
            dtype="bfloat16",
            started_at=started - 60.0 * (index % 90),
        )
        for key, wire in server_record_entries(args.swarm, record).items():
            keys.append(key)
            values.append(wire)
            subkeys.append(identity.peer_id)
    manifest = [
        {"peer": identity.peer_id, "span": [span.start, span.end], "state": state}
        for identity, (span, state) in zip(identities, layout, strict=True)
    ]
    Path(args.manifest).write_text(json.dumps(manifest))
    dht = hivemind.DHT(
        initial_peers=list(args.initial_peers) or None,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[_CrowdSigner(identities, args.ttl)],
        start=True,
    )
    try:

        async def store() -> int:
            # hivemind's pipe to its DHT process breaks on multi-megabyte calls: send batches.
            expiration, stored = get_dht_time() + args.ttl, 0
            for start in range(0, len(keys), _STORE_BATCH):
                batch = slice(start, start + _STORE_BATCH)
                future = dht.run_coroutine(
                    functools.partial(
                        _store_batch,
                        keys=keys[batch],
                        values=values[batch],
                        expiration=expiration,
                        subkeys=subkeys[batch],
                    ),
                    return_future=True,
                )
                stored += await asyncio.wait_for(asyncio.wrap_future(future), 60)
            return stored

        stored = await store()
        if args.mqtt:
            offline = [
                identity
                for identity, (_, state) in zip(identities, layout, strict=True)
                if state == "offline"
            ]
            await _publish_offline(args.mqtt, args.swarm, offline)
        maddr = dht.get_visible_maddrs()[0]
        print(f"READY {maddr} {identities[0].peer_id} {len(identities)} {stored}", flush=True)
        while True:
            await asyncio.sleep(args.period)  # the re-announcement period, not a wait for state
            await store()
            if args.mqtt:  # fresh messages: readers drop telemetry older than a few minutes
                await _publish_offline(args.mqtt, args.swarm, offline)
    finally:
        dht.shutdown()


async def main(args: argparse.Namespace) -> None:
    if args.role == "crowd":
        await run_crowd(args)
        return
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
    parser.add_argument("role", choices=["server", "trainer", "crowd"])
    parser.add_argument("--swarm", default="healthtest")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--span", default="0:2")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--run", default="demo")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--period", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=100, help="crowd: servers in this process")
    parser.add_argument("--first", type=int, default=0, help="crowd: index of the first server")
    parser.add_argument("--thin", default="", help="crowd: a span left thin, e.g. 57:59")
    parser.add_argument("--seed", type=int, default=0, help="crowd: layout seed")
    parser.add_argument("--manifest", default="crowd.json", help="crowd: where to write who is where")
    parser.add_argument("--mqtt", default="", help="crowd: broker to report the offline servers to")
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)

"""Swarm RPC against a raw ZeroMQ DEALER/ROUTER echo of the same bytes.

Both run in the same program against one server process (uvloop, CURVE on for both):
the raw side sends the exact frames Swarm's encoder produces and the server's raw
ROUTER echoes them; the Swarm side calls an echo handler that decodes the request and
encodes it back. Measurements alternate A/B in rounds, and CPU steal from /proc/stat
is recorded next to each phase.

    python benchmarks/transport.py --quick

The last line is ``transport rtt_ratio=<swarm/raw> throughput_ratio=<swarm/raw>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import zmq
import zmq.asyncio

from transport import Endpoint, KeyPair, Message, encode_message, message


@message("bench.echo")
class Echo(Message):
    hidden: torch.Tensor


async def echo(request: Echo, context: object) -> Echo:
    return request


@dataclass(frozen=True)
class Plan:
    rounds: int
    small_calls: int  # round trips per side per round, small request
    big_calls: int  # round trips per side per round, 16 MiB tensor


QUICK = Plan(rounds=12, small_calls=100, big_calls=1)
FULL = Plan(rounds=40, small_calls=250, big_calls=2)


def read_steal() -> tuple[int, int]:
    """(steal jiffies, total jiffies) of all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0, 1
    steal = values[7] if len(values) > 7 else 0
    return steal, sum(values[:8])


async def serve() -> None:
    """Server process: a Swarm echo endpoint and a raw ROUTER echo, same key pair."""
    keys = KeyPair.generate()
    endpoint = Endpoint(keys)
    endpoint.add_handler(Echo, echo)
    swarm_address = await endpoint.bind("tcp://127.0.0.1:0")
    context = zmq.asyncio.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_secretkey, router.curve_publickey, router.curve_server = keys.secret, keys.public, True
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(f"READY {swarm_address} tcp://127.0.0.1:{port} {keys.public.decode()}", flush=True)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    while not stop.done():
        receiving = asyncio.ensure_future(router.recv_multipart(copy=False))
        await asyncio.wait([receiving, stop], return_when=asyncio.FIRST_COMPLETED)
        if receiving.done():
            await router.send_multipart(receiving.result(), copy=False)
        else:
            receiving.cancel()
    router.close(linger=0)
    context.term()
    await endpoint.close()


async def measure(plan: Plan) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        ready = server.stdout.readline().split()  # type: ignore[union-attr]
        if not ready or ready[0] != "READY":
            raise SystemExit("benchmark server did not start")
        swarm_address, raw_address, server_key = ready[1], ready[2], ready[3].encode()
        await run_rounds(plan, swarm_address, raw_address, server_key)
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=10)


async def run_rounds(plan: Plan, swarm_address: str, raw_address: str, server_key: bytes) -> None:
    client = Endpoint()
    connection = await client.connect(swarm_address, server_key)
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.DEALER)
    raw.linger = 0
    raw.curve_secretkey, raw.curve_publickey = client.keys.secret, client.keys.public
    raw.curve_serverkey = server_key
    raw.connect(raw_address)

    async def raw_round_trip(frames: list) -> None:
        await raw.send_multipart(frames, copy=False)
        await raw.recv_multipart(copy=False)

    small, big = Echo(torch.randn(4096)), Echo(torch.randn(4 * 2**20))  # 16 KiB, 16 MiB
    small_frames, big_frames = encode_message(small, 1), encode_message(big, 1)
    for _ in range(20):  # warm up both paths
        await connection.call(small)
        await raw_round_trip(small_frames)
    times: dict[str, list[float]] = {"swarm small": [], "raw small": [], "swarm big": [], "raw big": []}
    steal: dict[str, list[float]] = {"small": [], "big": []}

    async def timed(name: str, calls: int, run) -> None:
        for _ in range(calls):
            start = time.perf_counter()
            await run()
            times[name].append(time.perf_counter() - start)

    for round_index in range(plan.rounds):
        for phase, calls, request, frames in (
            ("small", plan.small_calls, small, small_frames),
            ("big", plan.big_calls, big, big_frames),
        ):
            steal_before = read_steal()
            sides = [
                (f"swarm {phase}", lambda r=request: connection.call(r)),
                (f"raw {phase}", lambda f=frames: raw_round_trip(f)),
            ]
            for name, run in sides if round_index % 2 == 0 else reversed(sides):
                await timed(name, calls, run)
            steal_after = read_steal()
            total = max(1, steal_after[1] - steal_before[1])
            steal[phase].append(100.0 * (steal_after[0] - steal_before[0]) / total)

    raw.close(linger=0)
    context.term()
    await client.close()
    report(times, steal, big.hidden.numel() * 4)


def report(times: dict[str, list[float]], steal: dict[str, list[float]], big_bytes: int) -> None:
    rtt = {side: statistics.median(times[f"{side} small"]) for side in ("swarm", "raw")}
    # throughput: tensor bytes echoed per second (median round trip of the 16 MiB tensor)
    throughput = {side: big_bytes / statistics.median(times[f"{side} big"]) for side in ("swarm", "raw")}
    print(f"{'measurement':<34}{'swarm':>12}{'raw zmq':>12}{'ratio':>8}{'steal %':>9}")
    print(
        f"{'small rtt, 4096 fp32 (us, median)':<34}{rtt['swarm'] * 1e6:>12.1f}{rtt['raw'] * 1e6:>12.1f}"
        f"{rtt['swarm'] / rtt['raw']:>8.2f}{max(steal['small']):>9.1f}"
    )
    print(
        f"{'16 MiB echo (MiB/s, median)':<34}{throughput['swarm'] / 2**20:>12.1f}"
        f"{throughput['raw'] / 2**20:>12.1f}{throughput['swarm'] / throughput['raw']:>8.2f}"
        f"{max(steal['big']):>9.1f}"
    )
    print(
        f"samples: small {len(times['swarm small'])}+{len(times['raw small'])}, "
        f"big {len(times['swarm big'])}+{len(times['raw big'])}; CURVE on both sides; steal = max over rounds"
    )
    print(
        f"transport rtt_ratio={rtt['swarm'] / rtt['raw']:.3f} "
        f"throughput_ratio={throughput['swarm'] / throughput['raw']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under 60 s on 2 cores)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    if args.serve:
        asyncio.run(serve())
    else:
        asyncio.run(measure(QUICK if args.quick else FULL))


if __name__ == "__main__":
    main()

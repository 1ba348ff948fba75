"""Plain against streaming DiLoCo over emulated slow links: the share of time members compute.

Three real `swarm train` processes train a model large enough that one plain
all-reduce takes a noticeable share of a round, with every member's data plane behind
an emulated link of 100 Mbit/s and 50 ms round trip (the user-space delaying proxy of
benchmarks/_proxy.py: each member announces the proxy's address, so every byte
another member sends it waits for the link's transfer time plus 25 ms each way; netem
is not available here). The DHT is not shaped.

- plain: each round the members stop, form a group and all-reduce the whole model;
- streaming: P fragments, one synced every H/P inner steps, its exchange overlapping
  tau = H/P inner steps (``--streaming-fragments P --overlap-steps H/P``).

Utilization is the share of wall time a member spends in inner steps, read from its
log ("round N done: ... inner X of Y s") between its first and last logged outer step
(start-up and the first, waiting matchmaking are left out), averaged over the members.

Last line: ``diloco_wan plain_utilization=<f> streaming_utilization=<f>``
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks._common import free_port
from benchmarks._proxy import proxy_main
from kernels.tiny import write_tiny_checkpoint
from peers.processes import ProcessGroup
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity

MEMBERS = 3
INNER = re.compile(r"round (\d+) done: .* (\d+) members, .* inner (\S+) of (\S+) s")


def utilization(lines: list[str]) -> tuple[float, int, float]:
    """(inner share between the first and last outer step, outer steps logged, wall seconds between
    the first and the last) of one member's log."""
    points = [(float(m.group(3)), float(m.group(4))) for m in map(INNER.search, lines) if m]
    if len(points) < 2:
        return float("nan"), len(points), 0.0
    (inner_first, wall_first), (inner_last, wall_last) = points[0], points[-1]
    return (inner_last - inner_first) / max(wall_last - wall_first, 1e-9), len(points), wall_last - wall_first


def run_mode(name: str, model: Path, workdir: Path, common: list[str], extra: list[str], syncs: int,
             one_way, bits_per_second, steps_per_sync: int) -> float:  # fmt: skip
    """Start the members behind the proxy, wait for ``syncs`` outer steps each, stop them."""
    context = multiprocessing.get_context("spawn")
    ports = [free_port() for _ in range(MEMBERS)]
    routes = [(f"127.0.0.{i + 2}", port) for i, port in enumerate(ports)]
    ready = context.Event()
    proxy = context.Process(target=proxy_main, args=(routes, one_way, bits_per_second, ready), daemon=True)
    proxy.start()
    if not ready.wait(60):
        raise RuntimeError("the link-emulating proxy did not start")
    bootstrap = SwarmDHT(
        Identity.generate(), DHTConfig(swarm_name="wan", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    )
    bootstrap.start()
    group = ProcessGroup(workdir)
    try:
        members = []
        for i, (host, port) in enumerate(routes):
            args = [
                "train", "--model", str(model), "--init", "random", "--run", name, "--swarm", "wan",
                "--initial-peers", bootstrap.visible_maddrs()[0], "--identity", str(workdir / f"{name}{i}.pem"),
                "--port", str(port), "--announce-host", host, "--reachability", "direct", *common, *extra,
            ]  # fmt: skip
            members.append(group.start(f"{name}-{i}", args))
        for member in members:
            member.wait_for(lambda line: (m := INNER.search(line)) and int(m.group(1)) >= syncs,
                            f"outer step {syncs}", timeout=600)  # fmt: skip
        shares = []
        for i, member in enumerate(members):
            share, steps, seconds = utilization(member.lines)
            rate = (steps - 1) * steps_per_sync / max(seconds, 1e-9)  # at most: a slower member ends early
            print(f"{name:<10} member {i}: {steps} outer steps in {seconds:.1f} s (<= {rate:.2f} inner steps/s), "
                  f"inner share {share:.3f}")  # fmt: skip
            shares.append(share)
        for member in members:
            member.terminate(timeout=120)
        return sum(shares) / len(shares)
    finally:
        group.close()
        bootstrap.shutdown()
        proxy.terminate()
        proxy.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (a few minutes on 2 cores)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="emulated round trip, ms")
    parser.add_argument("--mbit", type=float, default=100.0, help="emulated link, Mbit/s")
    parser.add_argument("--fragments", type=int, default=2, help="streaming: P")
    parser.add_argument("--hidden", type=int, help="model width (default: 256 quick, 512 full)")
    parser.add_argument("--inner-steps", type=int, help="H (default: 16 quick, 32 full)")
    parser.add_argument("--rounds", type=int, help="plain rounds to run (default: 3 quick, 8 full)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="sequences of 128 tokens per inner step (sets compute per step)",
    )
    args = parser.parse_args()
    hidden = args.hidden or (256 if args.quick else 512)
    inner_steps = args.inner_steps or (16 if args.quick else 32)
    rounds = args.rounds or (3 if args.quick else 8)
    context = multiprocessing.get_context("spawn")
    one_way, bits_per_second = context.Value("d", args.rtt_ms / 2000), context.Value("d", args.mbit * 1e6)
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        config = write_tiny_checkpoint(workdir / "model", num_layers=4, hidden_size=hidden, vocab_size=512)
        numel = config.num_layers * (3 * hidden * hidden + 3 * hidden * config.intermediate_size)
        print(f"model: ~{numel / 1e6:.1f}M block parameters (+ embeddings); {MEMBERS} members; "
              f"links {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT; H={inner_steps}")  # fmt: skip
        common = [
            "--inner-steps", str(inner_steps), "--seq-len", "128", "--batch-size", str(args.batch_size), "--corpus-bytes",
            "400000", "--warmup-steps", "4", "--matchmaking-seconds", "10", "--phase-timeout", "30",
            "--record-ttl", "10",
        ]  # fmt: skip
        started = time.perf_counter()
        plain = run_mode(
            "plain", workdir / "model", workdir, common, [], rounds, one_way, bits_per_second, inner_steps
        )
        every = inner_steps // args.fragments
        streaming_flags = ["--streaming-fragments", str(args.fragments), "--overlap-steps", str(every)]
        streaming = run_mode(
            "streaming", workdir / "model", workdir, common, streaming_flags, rounds * args.fragments,
            one_way, bits_per_second, every,
        )  # fmt: skip
        print(f"time: {time.perf_counter() - started:.1f} s")
    print(f"diloco_wan plain_utilization={plain:.4f} streaming_utilization={streaming:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

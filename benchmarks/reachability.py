"""Reachability benchmark: greedy generation through 3 servers, all direct vs the middle one behind NAT.

Two swarms run at once on network namespaces (``tests/netns.py``: veth pairs, a router
namespace with nftables masquerade), each of 3 ``swarm join`` servers of the same
checkpoint (sized as in ``benchmarks/inference.py``: 12 blocks of width 1024):

* direct: the 3 servers on public hosts (ZeroMQ all the way);
* relayed: the middle server behind NAT (``--reachability auto``: its check says
  relayed), reached over libp2p through relays on the internet side.

One client process on a public host generates the same greedy tokens through both,
interleaved A B A B, and reports milliseconds per token. Every token crosses the
relayed server once (client -> relay -> server and back), so the difference is the
relay's cost per hop. Needs root (namespaces); CPU steal is recorded next to the numbers.

The last line is machine-readable::

    reachability direct_ms_per_token=<f> relayed_ms_per_token=<f> relay_overhead_ms_per_hop=<f>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

PROMPT = [[1, 17, 42, 99, 7, 300]]


def _join(checkpoint: Path, blocks: str, host: str, peers: list[str], swarm: str, threads: int, *extra: str):
    return [
        sys.executable, "-m", "peers.cli", "join", "--model", str(checkpoint), "--blocks", blocks,
        "--host", host, "--swarm", swarm, "--initial-peers", *peers, "--torch-threads", str(threads),
        "--push-wait", "5", "--throughput-cache", str(checkpoint.parent / "throughput.json"), *extra,
    ]  # fmt: skip


def _line(process: subprocess.Popen, prefix: str, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"a process exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix!r} within {timeout}s")


async def _client(args: argparse.Namespace) -> None:
    """Runs inside the client's namespace: A B A B generations, prints one JSON line."""
    from swarm.serving import ClientConfig, RemoteModel

    config = ClientConfig(route_wait=30.0, step_timeout=30.0, open_timeout=30.0)
    prompt = torch.tensor(PROMPT)
    models = {}
    for name, peer in (("direct", args.direct_peer), ("relayed", args.relayed_peer)):
        models[name] = await RemoteModel.connect(args.checkpoint, [peer], swarm=name, config=config)
        deadline = time.monotonic() + 120
        while len(await models[name].list_servers()) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
    times: dict[str, list[float]] = {"direct": [], "relayed": []}
    outputs = {}
    try:
        for name in ("direct", "relayed"):  # warm-up: connections, caches
            outputs[name] = await models[name].generate(prompt, 2)
        for _ in range(args.rounds):
            for name in ("direct", "relayed"):
                start = time.perf_counter()
                outputs[name] = await models[name].generate(prompt, args.tokens)
                times[name].append((time.perf_counter() - start) * 1000 / args.tokens)
    finally:
        for model in models.values():
            await model.close()
    same = bool(torch.equal(outputs["direct"], outputs["relayed"]))
    print("RESULT " + json.dumps({"times": times, "same_tokens": same}), flush=True)


def _steal() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return fields[7], sum(fields)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--direct-peer", help=argparse.SUPPRESS)
    parser.add_argument("--relayed-peer", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args))
        return
    if args.quick:
        args.tokens, args.rounds = 16, 3

    from kernels.tiny import make_random_state, save_checkpoint, write_tiny_checkpoint
    from tests.netns import NatLab, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"reachability benchmark: {reason}")
    with tempfile.TemporaryDirectory() as tmp, NatLab() as lab:
        checkpoint = Path(tmp) / "model"
        config = write_tiny_checkpoint(checkpoint, num_layers=12, hidden_size=1024, vocab_size=512)
        save_checkpoint(checkpoint, config, make_random_state(config, seed=0, std=0.02))  # as inference.py
        hosts = {name: lab.public(name) for name in ("a1", "a2", "a3", "b1", "b3", "relays", "client")}
        home = lab.behind_nat("b2")
        relay = hosts["relays"].spawn(
            [
                sys.executable,
                "-m",
                "tests.netns_roles",
                "relay",
                "--host",
                hosts["relays"].address,
                "--count",
                "4",
            ]
        )
        relay_maddrs = json.loads(_line(relay, "READY").split(" ", 1)[1])["maddrs"]
        firsts = {}
        for swarm, host in (("direct", "a1"), ("relayed", "b1")):
            process = hosts[host].spawn(
                _join(checkpoint, "0:4", hosts[host].address, [], swarm, args.threads)
            )
            firsts[swarm] = _line(process, "initial peer for others:").rsplit(" ", 1)[1]
            _line(process, "ONLINE")
        servers = [
            hosts["a2"].spawn(_join(checkpoint, "4:8", hosts["a2"].address, [firsts["direct"]], "direct", args.threads)),
            hosts["a3"].spawn(_join(checkpoint, "8:12", hosts["a3"].address, [firsts["direct"]], "direct", args.threads)),
            home.spawn(_join(checkpoint, "4:8", home.address, [firsts["relayed"], *relay_maddrs], "relayed", args.threads)),
            hosts["b3"].spawn(_join(checkpoint, "8:12", hosts["b3"].address, [firsts["relayed"]], "relayed", args.threads)),
        ]  # fmt: skip
        print(_line(servers[2], "reachability:"), flush=True)
        for process in servers:
            _line(process, "ONLINE")
        steal_before = _steal()
        client = hosts["client"].spawn(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--client",
                "--checkpoint",
                str(checkpoint),
                "--direct-peer",
                firsts["direct"],
                "--relayed-peer",
                firsts["relayed"],
                "--tokens",
                str(args.tokens),
                "--rounds",
                str(args.rounds),
            ]
        )
        result = json.loads(_line(client, "RESULT", timeout=1200).split(" ", 1)[1])
        steal_after = _steal()
    steal = 100 * (steal_after[0] - steal_before[0]) / max(1, steal_after[1] - steal_before[1])
    direct = sorted(result["times"]["direct"])[len(result["times"]["direct"]) // 2]
    relayed = sorted(result["times"]["relayed"])[len(result["times"]["relayed"]) // 2]
    print(f"{'path':<10}{'ms/token (each round)':<48}median")
    for name, median in (("direct", direct), ("relayed", relayed)):
        rounds = " ".join(f"{t:.1f}" for t in result["times"][name])
        print(f"{name:<10}{rounds:<48}{median:.1f}")
    print(
        f"same greedy tokens: {result['same_tokens']}; cpu steal {steal:.1f}%; {args.tokens} tokens x {args.rounds}"
    )
    print(
        f"reachability direct_ms_per_token={direct:.2f} relayed_ms_per_token={relayed:.2f} "
        f"relay_overhead_ms_per_hop={relayed - direct:.2f}"
    )


if __name__ == "__main__":
    main()

"""Inference benchmark: local generation vs generation through 3 `swarm join` servers.

Same checkpoint (12 blocks of width 1024, random), 64 greedy tokens, both in the same
run, interleaved A B A B; CPU steal from /proc/stat is recorded next to the numbers.
The last line is machine-readable:

    inference servers=3 local_ms_per_token=<f> swarm_ms_per_token=<f> overhead_ms_per_hop=<f>

``--quick`` runs only this comparison on loopback (full mode is the same for now:
emulated WAN links and the 16-session batching gain are not measured yet).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and benchmarks/transport.py and
# benchmarks/kernels.py would shadow the packages of the same names.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks._common import median, steal_meter

SERVERS = 3


def _time_local(model, prompt: torch.Tensor, new_tokens: int) -> float:
    from kernels import generate

    started = time.perf_counter()
    generate(model, prompt, new_tokens)
    return (time.perf_counter() - started) * 1000 / new_tokens


async def _time_swarm(remote, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    output = await remote.generate(prompt, new_tokens)
    return (time.perf_counter() - started) * 1000 / new_tokens, output


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="loopback comparison only, 2 repeats")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kernels import load_local_model
    from kernels.tiny import write_tiny_checkpoint
    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    repeats = 2 if args.quick else 4
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = tmp_path / "model"
        write_tiny_checkpoint(checkpoint, num_layers=args.layers, hidden_size=args.hidden, vocab_size=512)
        local = load_local_model(checkpoint)
        prompt = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
        bootstrap = SwarmDHT(
            Identity.generate(), DHTConfig(swarm_name="swarm", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
        )
        bootstrap.start()
        peers = [str(m) for m in bootstrap.visible_maddrs()]
        group = ProcessGroup(tmp_path)
        bounds = [round(i * args.layers / SERVERS) for i in range(SERVERS + 1)]
        try:
            processes = [
                group.start(
                    f"server{i}",
                    [
                        "join",
                        "--model",
                        str(checkpoint),
                        "--blocks",
                        f"{bounds[i]}:{bounds[i + 1]}",
                        "--initial-peers",
                        *peers,
                        "--torch-threads",
                        str(args.threads),
                        "--throughput-cache",
                        str(tmp_path / "throughput.json"),
                    ],
                )
                for i in range(SERVERS)
            ]
            for process in processes:
                process.wait_for_line("ONLINE", timeout=300)
            report: dict = {}
            with steal_meter(report):
                local_ms, swarm_ms = asyncio.run(
                    _compare(checkpoint, peers, local, prompt, args.tokens, repeats)
                )
        finally:
            group.close()
            bootstrap.shutdown()
    print(f"local ms/token (runs): {[f'{v:.1f}' for v in local_ms]}")
    print(f"swarm ms/token (runs): {[f'{v:.1f}' for v in swarm_ms]}")
    print(f"cpu steal during the runs: {report['steal_percent']:.1f}%")
    if not args.quick:
        print("full mode: emulated WAN links and the 16-session batching gain are not measured yet")
    local_median, swarm_median = median(local_ms), median(swarm_ms)
    overhead = (swarm_median - local_median) / SERVERS
    print(
        f"inference servers={SERVERS} local_ms_per_token={local_median:.2f} "
        f"swarm_ms_per_token={swarm_median:.2f} overhead_ms_per_hop={overhead:.2f}"
    )


async def _compare(checkpoint, peers, local, prompt, tokens: int, repeats: int):
    from swarm.serving import RemoteModel

    local_ms, swarm_ms = [], []
    async with await RemoteModel.connect(checkpoint, peers) as remote:
        await remote.generate(prompt, 4)  # warm up connections and sessions
        _time_local(local, prompt, 4)
        for _ in range(repeats):  # interleaved A B A B
            local_ms.append(_time_local(local, prompt, tokens))
            ms, output = await _time_swarm(remote, prompt, tokens)
            swarm_ms.append(ms)
        from kernels import generate

        if not torch.equal(output, generate(local, prompt, tokens)):
            print("WARNING: swarm output differs from local generation", file=sys.stderr)
    return local_ms, swarm_ms


if __name__ == "__main__":
    main()

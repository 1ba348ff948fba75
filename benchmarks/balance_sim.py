"""Simulates block selection and rebalancing in a large, churning swarm.

1,000 servers with a realistic mix of consumer and datacenter GPUs serve an 80-block
model (a Llama-2-70B-like model in 4-bit: ~0.5 GB per block plus attention cache).
Servers join, leave, and periodically consider moving, using the real
``swarm.selection.choose_span`` and ``swarm.rebalance.plan_move`` on a simulated clock.
Joining and moving servers are down while their weights load.

Baseline, measured in the same run: the upper bound on the minimum block coverage,
sum over online servers of ``throughput * span_length / n_blocks`` (all throughput
spread perfectly evenly). The program prints the ratio's median over time (after the
initial join wave) and the number of moves per server-hour.

    python benchmarks/balance_sim.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script, this folder comes first on sys.path, and its transport.py benchmark
# would shadow the transport package: put the repository root there instead.
_ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = _ROOT

from swarm.rebalance import RebalancePolicy, draw_check_delay, plan_move  # noqa: E402
from swarm.selection import choose_span  # noqa: E402
from swarm.spans import Span  # noqa: E402

# (name, share of servers, relative throughput, blocks that fit, mean hours online).
# Throughput: relative tokens/s per block. Blocks: 4-bit 70B blocks (~0.5 GB) plus cache.
GPU_MIX = (
    ("RTX 3060 12GB", 0.22, 1.0, 5, 3.0),
    ("RTX 3090 24GB", 0.25, 2.3, 11, 4.0),
    ("RTX 4090 24GB", 0.20, 3.6, 11, 4.0),
    ("A100 40GB", 0.10, 5.5, 20, 8.0),
    ("A100 80GB", 0.13, 6.0, 42, 10.0),
    ("H100 80GB", 0.10, 10.0, 42, 10.0),
)


@dataclasses.dataclass
class Server:
    gpu: str
    throughput: float
    max_blocks: int
    span: Span | None = None
    online: bool = False  # serving (counts for the metric)
    alive: bool = True
    version: int = 0  # bumps on every state change; stale events are dropped


@dataclasses.dataclass(frozen=True)
class SimConfig:
    n_servers: int = 1000
    n_blocks: int = 80
    hours: float = 12.0
    warmup_hours: float = 1.0  # the initial join wave is excluded from the median
    join_wave_s: float = 1800.0  # the first n_servers join spread over this window
    load_s: float = 180.0  # downtime while weights load (join or move)
    sample_every_s: float = 60.0
    policy: RebalancePolicy = dataclasses.field(default_factory=RebalancePolicy)
    seed: int = 0


class Simulation:
    def __init__(self, config: SimConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.servers: list[Server] = []
        n = config.n_blocks
        self.planned = np.zeros(n)  # joining + online: what a deciding server sees in the DHT
        self.serving = np.zeros(n)  # online only: what clients can use
        self.events: list[tuple[float, int, str, int, int]] = []
        self.counter = 0
        self.moves = 0
        self.server_seconds = 0.0
        self.samples: list[float] = []

    def push(self, at: float, kind: str, index: int) -> None:
        self.counter += 1
        heapq.heappush(
            self.events, (at, self.counter, kind, index, self.servers[index].version if index >= 0 else 0)
        )

    def new_server(self) -> int:
        names, shares = [g[0] for g in GPU_MIX], [g[1] for g in GPU_MIX]
        gpu = GPU_MIX[names.index(self.rng.choices(names, shares)[0])]
        throughput = gpu[2] * self.rng.uniform(0.8, 1.2)  # drivers, cooling, CPU, network
        self.servers.append(Server(gpu[0], throughput, min(gpu[3], self.config.n_blocks)))
        return len(self.servers) - 1

    def lifetime(self, server: Server) -> float:
        mean_hours = next(g[4] for g in GPU_MIX if g[0] == server.gpu)
        return self.rng.expovariate(1.0 / (mean_hours * 3600.0))

    def place(self, index: int, now: float) -> None:
        server = self.servers[index]
        server.span = choose_span(self.planned, server.max_blocks)
        self.planned[server.span.start : server.span.end] += server.throughput
        server.version += 1
        self.push(now + self.config.load_s, "online", index)

    def remove(self, server: Server) -> None:
        if server.span is not None:
            self.planned[server.span.start : server.span.end] -= server.throughput
            if server.online:
                self.serving[server.span.start : server.span.end] -= server.throughput
        server.online = False
        server.version += 1

    def upper_bound(self) -> float:
        total = sum(s.throughput * len(s.span) for s in self.servers if s.online and s.span is not None)
        return total / self.config.n_blocks

    def run(self) -> tuple[float, float]:
        config = self.config
        end = config.hours * 3600.0
        for _ in range(config.n_servers):
            self.push(self.rng.uniform(0, config.join_wave_s), "join", self.new_server())
        self.push(0.0, "sample", -1)
        while self.events:
            now, _, kind, index, version = heapq.heappop(self.events)
            if now > end:
                break
            if kind == "sample":
                bound = self.upper_bound()
                if now >= config.warmup_hours * 3600.0 and bound > 0:
                    self.samples.append(float(self.serving.min()) / bound)
                self.server_seconds += config.sample_every_s * sum(s.alive for s in self.servers)
                self.push(now + config.sample_every_s, "sample", -1)
                continue
            server = self.servers[index]
            if kind == "join":
                self.place(index, now)
                self.push(now + self.lifetime(server), "leave", index)
            elif kind == "leave":
                self.remove(server)
                server.alive = False
                # Someone else joins after a while: the population stays near n_servers.
                self.push(now + self.rng.expovariate(1 / 600.0), "join", self.new_server())
            elif version != server.version:
                continue  # the server moved or left since this event was scheduled
            elif kind == "online":
                server.online = True
                self.serving[server.span.start : server.span.end] += server.throughput
                self.push(now + draw_check_delay(config.policy, self.rng), "check", index)
            elif kind == "check":
                target = plan_move(
                    self.planned, server.span, server.throughput, server.max_blocks, config.policy
                )
                if target is None:
                    self.push(now + draw_check_delay(config.policy, self.rng), "check", index)
                else:
                    self.moves += 1
                    self.remove(server)
                    server.span = target
                    self.planned[target.start : target.end] += server.throughput
                    self.push(now + config.load_s, "online", index)
        moves_per_server_hour = self.moves / max(self.server_seconds / 3600.0, 1e-9)
        return statistics.median(self.samples), moves_per_server_hour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 simulated hours instead of 24")
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--min-gain", type=float, default=RebalancePolicy().min_gain)
    parser.add_argument("--min-relative-gain", type=float, default=RebalancePolicy().min_relative_gain)
    parser.add_argument("--check-period", type=float, default=RebalancePolicy().mean_check_period)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = SimConfig(
        n_servers=args.servers,
        n_blocks=args.blocks,
        hours=6.0 if args.quick else 24.0,
        policy=RebalancePolicy(
            min_gain=args.min_gain,
            min_relative_gain=args.min_relative_gain,
            mean_check_period=args.check_period,
        ),
        seed=args.seed,
    )
    started = time.perf_counter()
    simulation = Simulation(config)
    ratio, moves_per_server_hour = simulation.run()
    samples = simulation.samples
    print(f"servers={config.n_servers} blocks={config.n_blocks} hours={config.hours:g} seed={config.seed}")
    print(f"{'metric':<40}{'value':>10}")
    print(f"{'min coverage / upper bound, p10':<40}{np.percentile(samples, 10):>10.3f}")
    print(f"{'min coverage / upper bound, median':<40}{ratio:>10.3f}")
    print(f"{'min coverage / upper bound, p90':<40}{np.percentile(samples, 90):>10.3f}")
    print(f"{'servers joined (incl. replacements)':<40}{len(simulation.servers):>10d}")
    print(f"{'moves':<40}{simulation.moves:>10d}")
    print(f"{'wall seconds':<40}{time.perf_counter() - started:>10.1f}")
    print(f"balance min_coverage_vs_optimum={ratio:.3f} moves_per_server_hour={moves_per_server_hour:.3f}")


if __name__ == "__main__":
    main()

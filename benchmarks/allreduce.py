"""Our all-reduce against torch.distributed (gloo) and hivemind's DecentralizedAverager (issue #6).

Every system runs in its own set of ``--peers`` processes (multiprocessing spawn) on
127.0.0.1 and averages the same number of float32 values. The sets run one after
another (one set at a time bounds the memory); within ours, the variants (below)
take turns round by round so that load from other
users of the machine falls on them alike. A round starts when the parent and the set's members
pass a shared ``multiprocessing.Barrier``; each member times its own round (wall
clock) and the round's time is the slowest member's; members wait for each other
before the bookkeeping after a round (a digest, the next round's copy), which would
otherwise take CPU from members still in it. The first round of each system
is a warm-up; the table shows the median of the timed rounds.

- ours: ``AveragingService.all_reduce`` over ``transport.Endpoint`` (ZeroMQ). The
  headline variant "ours" runs what ``swarm train`` runs by default, read from
  ``TrainerConfig``'s defaults: CURVE on, ``--compression int8``, ``--aggregation
  centered_clip``, backups verifying (``--verify-reducers``). The other variants keep
  the fp32 speed in view: "ours-fp32" (the same, uncompressed), "ours-plain" (fp32,
  CURVE off: the cost of encryption) and "ours-mean" (fp32, CURVE on, the weighted mean
  that gloo and hivemind compute: the cost of the robust rule). Two more bound what any
  change of ours could reach on the machine at hand: "ours-nocurve" (the defaults with
  CURVE off: no cipher arrangement can cost less than none) and "ours-bare" (int8, CURVE
  off, the weighted mean, no backups: the protocol itself, without encryption,
  robustness or verification). Bytes sent are counted by the service.
- gloo: ``torch.distributed.all_reduce`` (sum) on a CPU tensor; bytes sent are the
  ring all-reduce's 2 (M-1)/M x vector bytes (a formula, not a measurement).
- hivemind: ``DecentralizedAverager`` with a fixed group of ``--peers``. Matchmaking is
  timed apart from the all-reduce: a step is scheduled with ``require_trigger=True``,
  the members wait for their group to form (reported as "matchmaking"), then pass the
  barrier and trigger it; the round time is trigger to result. Bytes sent are the
  butterfly's 2 (M-1)/M x vector bytes (formula).

The full mode adds a round of ours in which the last member SIGKILLs itself as it
sends its first "result" message, and reports the survivors' round time (bounded by
the scatter + gather deadlines it sets) and whether they ended bit-identical.

Last line: ``allreduce peers=<M> vs_gloo=<ours / gloo> vs_hivemind=<ours / hivemind>``
(throughput of the headline "ours": ``swarm train``'s defaults, so int8 on the wire
against gloo's and hivemind's fp32; "like for like" above it compares fp32 weighted means).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from threading import BrokenBarrierError

import numpy as np
import torch

# Run as a script, this folder comes first on sys.path and its kernels.py / transport.py
# benchmarks would shadow the packages of the same names: put the repository root there.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks._common import free_port, median, read_cpu_times

SAMPLE = 4096  # values of each averaged vector sent back to check the mean


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures."""

    peers: int = 4
    """Processes per system."""
    megabytes: float = 100.0
    """Size of the averaged float32 vector, in 10**6 bytes."""
    rounds: int = 3
    """Timed rounds per system (after one warm-up round)."""
    hivemind_rounds: int = 3
    """Timed rounds for hivemind (each also pays matchmaking)."""
    kill: bool = False
    """Add a round of ours with one member SIGKILLed mid-round."""
    kill_deadline: float = 3.0
    """Scatter and gather deadlines (each) of the round with a killed member, seconds."""
    systems: tuple[str, ...] = ("ours", "gloo", "hivemind")
    """Which systems to run ("ours" covers all its variants, see OURS)."""

    @property
    def numel(self) -> int:
        return int(self.megabytes * 1e6) // 4 // 64 * 64

    @property
    def vector_bytes(self) -> int:
        return self.numel * 4


def _train_defaults() -> dict:
    """``swarm train``'s defaults (TrainerConfig's field defaults; constructing one needs --model)."""
    from dataclasses import fields

    from swarm.training.trainer_config import TrainerConfig

    return {field.name: field.default for field in fields(TrainerConfig)}


_DEFAULTS = _train_defaults()
OURS = {  # variant name -> (encrypted, compression, aggregation rule, backups verify)
    "ours": (True, _DEFAULTS["compression"], _DEFAULTS["aggregation"], _DEFAULTS["verify_reducers"]),
    "ours-fp32": (True, "none", _DEFAULTS["aggregation"], _DEFAULTS["verify_reducers"]),
    "ours-plain": (False, "none", _DEFAULTS["aggregation"], _DEFAULTS["verify_reducers"]),
    "ours-mean": (True, "none", "mean", _DEFAULTS["verify_reducers"]),  # as gloo and hivemind compute
    "ours-nocurve": (False, _DEFAULTS["compression"], _DEFAULTS["aggregation"], _DEFAULTS["verify_reducers"]),
    "ours-bare": (False, _DEFAULTS["compression"], "mean", False),
}


@dataclass
class RoundResult:
    """One member's report of one round."""

    seconds: float
    bytes_sent: int
    digest: str = ""
    sample: np.ndarray | None = None
    contribution: np.ndarray | None = None
    matchmaking: float = 0.0
    extra: dict = field(default_factory=dict)


def _make_vector(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 + rank))


def _sample(tensor: torch.Tensor) -> np.ndarray:
    """The first SAMPLE values, as numpy: a torch tensor put on a multiprocessing queue makes
    torch fork its shared-memory manager from the member (the first time), which write-protects
    every page the member has: its next round paid ~100k page faults (~0.5 s here) for it."""
    return tensor[:SAMPLE].numpy().copy()


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16]


# -- ours -----------------------------------------------------------------------------------


def _ours_worker(rank, settings, barrier, settled, to_parent, from_parent, results):
    torch.set_num_threads(1)
    asyncio.run(_ours_member(rank, settings, barrier, settled, to_parent, from_parent, results))


async def _ours_member(rank, settings, barrier, settled, to_parent, from_parent, results):
    from swarm.training.allreduce import AllReduceTimeouts, Member
    from swarm.training.averaging import AveragingService
    from swarm.training.robust import RobustConfig
    from transport import Endpoint

    vector = _make_vector(rank, settings.numel)
    endpoints, services = {}, {}
    # the last member dies in the kill round, which runs on "ours" (see the plan below)
    before_send = _kill_on_first_result if rank == settings.peers - 1 else None
    for variant, (encrypted, compression, _, _) in OURS.items():  # one endpoint and service per variant
        endpoints[variant] = Endpoint(encrypted=encrypted)
        address = await endpoints[variant].bind("tcp://127.0.0.1:0")
        services[variant] = AveragingService(
            endpoints[variant], compression, registration_wait=60, before_send=before_send
        )
        to_parent.put((rank, variant, address, endpoints[variant].public_key if encrypted else b""))
    addresses = from_parent.get()
    members = {
        variant: [Member(f"peer{i}", 1.0, address, key) for i, address, key in addresses[variant]]
        for variant in OURS
    }
    timeouts = AllReduceTimeouts(scatter=60, gather=60, repair=30, call=60)
    plan = from_parent.get()  # [(variant, round index), ...] in the parent's order
    for variant, index in plan:
        work = vector.clone()  # averaged in place, as gloo's all_reduce below
        await asyncio.to_thread(barrier.wait)
        round_timeouts = timeouts
        if variant == "kill":
            deadline = settings.kill_deadline
            round_timeouts = AllReduceTimeouts(
                scatter=deadline, gather=deadline, repair=deadline, call=deadline
            )
        start = time.perf_counter()
        service = services.get(variant, services["ours"])  # the kill round runs on "ours"
        _, _, rule, verify = OURS.get(variant, OURS["ours"])
        outcome = await service.all_reduce(
            f"{variant}-{index}",
            members.get(variant, members["ours"]),
            rank,
            work,
            1.0,
            round_timeouts,
            out=work,
            robust=RobustConfig(
                rule=rule,
                max_weight_ratio=_DEFAULTS["max_weight_ratio"],
                max_norm_ratio=_DEFAULTS["max_norm_ratio"],
            ),
            verify=verify,
        )
        seconds = time.perf_counter() - start
        if variant != "kill":  # (one member of the kill round never gets here)
            await asyncio.to_thread(settled.wait)
        results.put(
            (
                rank,
                RoundResult(
                    seconds,
                    outcome.bytes_sent,
                    _digest(outcome.averaged),
                    _sample(outcome.averaged),
                    _sample(vector),
                    extra={"repaired": outcome.report.repaired_parts},
                ),
            )
        )
    await asyncio.to_thread(barrier.wait)  # nobody closes while another still needs it
    for service in services.values():
        await service.close()
    for endpoint in endpoints.values():
        await endpoint.close()


def _kill_on_first_result(send) -> None:
    """``before_send`` of the member the kill round loses: SIGKILL as it sends its first result."""
    if send.round_id.startswith("kill-") and send.kind == "result":
        os.kill(os.getpid(), signal.SIGKILL)


# -- gloo -----------------------------------------------------------------------------------


def _gloo_worker(rank, settings, barrier, settled, port, rounds, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=settings.peers
    )
    vector = _make_vector(rank, settings.numel)
    for _ in range(rounds):
        work = vector.clone()  # before the barrier, as for ours
        barrier.wait()
        start = time.perf_counter()
        dist.all_reduce(work)
        work /= settings.peers
        seconds = time.perf_counter() - start
        settled.wait()
        sent = 2 * (settings.peers - 1) * settings.vector_bytes // settings.peers
        results.put((rank, RoundResult(seconds, sent, _digest(work), _sample(work), _sample(vector))))
    barrier.wait()
    dist.destroy_process_group()


# -- hivemind -------------------------------------------------------------------------------


def _hivemind_worker(rank, settings, barrier, settled, to_parent, from_parent, rounds, results):
    import hivemind
    from hivemind.averaging.control import AveragingStage

    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # hivemind's averager is a forked child process
    initial_peers = from_parent.get()
    dht = hivemind.DHT(
        initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=60, start=True
    )
    if rank == 0:
        to_parent.put([str(address) for address in dht.get_visible_maddrs()])
    vector = _make_vector(rank, settings.numel)
    averager = hivemind.DecentralizedAverager(
        [vector.clone()],
        dht,
        prefix="allreduce-benchmark",
        target_group_size=settings.peers,
        min_group_size=settings.peers,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        start=True,
    )
    for _ in range(rounds):
        with averager.get_tensors() as tensors:
            tensors[0].copy_(vector)
        barrier.wait()
        start = time.perf_counter()
        control = averager.step(wait=False, require_trigger=True, timeout=60)
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            time.sleep(0.002)
        matchmaking = time.perf_counter() - start
        barrier.wait()  # all members have their group: start the all-reduce together
        start = time.perf_counter()
        control.allow_allreduce()
        control.result(timeout=120)
        seconds = time.perf_counter() - start
        settled.wait()
        with averager.get_tensors() as tensors:
            averaged = tensors[0].clone()
        sent = 2 * (settings.peers - 1) * settings.vector_bytes // settings.peers
        results.put(
            (
                rank,
                RoundResult(
                    seconds,
                    sent,
                    _digest(averaged),
                    _sample(averaged),
                    _sample(vector),
                    matchmaking=matchmaking,
                ),
            )
        )
    barrier.wait()
    averager.shutdown()
    dht.shutdown()


# -- the conductor --------------------------------------------------------------------------


@dataclass
class SystemRounds:
    """Per round: the members' reports; plus the CPU steal measured over its rounds."""

    rounds: list[list[RoundResult]] = field(default_factory=list)
    steal_jiffies: int = 0
    total_jiffies: int = 0


class _Group:
    """One system's set of member processes, with the barrier and queue the parent drives it by."""

    def __init__(self, context, name: str, peers: int):
        self.name = name
        self.peers = peers
        self.barrier = context.Barrier(peers + 1)
        self.settled = context.Barrier(peers)
        """Members pass it once they timed a round, before its bookkeeping (a digest of the
        result, the next round's copy of the vector): a member done early took ~0.1 s of CPU
        for those while slower ones were still in the round, on the same cores."""
        self.results = context.Queue()
        self.up = context.Queue()
        self.down = [context.Queue() for _ in range(peers)]
        self.processes: list = []

    def check_alive(self) -> None:
        dead = [p.exitcode for p in self.processes if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(
                f"{self.name}: a member process died (exit codes {dead}); see its traceback above"
            )

    def get(self, queue, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return queue.get(timeout=1.0)
            except Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name}: no answer from its members in {timeout:.0f} s"
                    ) from None

    def wait(self, timeout: float = 180.0) -> None:
        try:
            self.barrier.wait(timeout=timeout)
        except BrokenBarrierError:
            self.check_alive()
            raise RuntimeError(f"{self.name}: members did not reach the barrier in {timeout:.0f} s") from None

    def collect(self, count: int | None = None) -> list[RoundResult]:
        reports = {}
        while len(reports) < (count or self.peers):
            rank, report = self.get(self.results)
            reports[rank] = report
        return [reports[rank] for rank in sorted(reports)]


def _check_mean(reports: list[RoundResult]) -> float:
    """Largest deviation of the returned sample from the mean of the contributions."""
    expected = np.stack([r.contribution for r in reports]).mean(0)
    return max(float(np.abs(r.sample - expected).max()) for r in reports)


def _measure(measured: dict[str, SystemRounds], name: str, run_round) -> None:
    total_before, steal_before = read_cpu_times()
    reports = run_round()
    total_after, steal_after = read_cpu_times()
    rounds = measured.setdefault(name, SystemRounds())
    rounds.rounds.append(reports)
    rounds.total_jiffies += total_after - total_before
    rounds.steal_jiffies += steal_after - steal_before


def _start_group(context, name: str, settings: Settings) -> _Group:
    peers = settings.peers
    group = _Group(context, name, peers)
    for rank in range(peers):
        common = (rank, settings, group.barrier, group.settled)
        if name == "ours":
            arguments = (*common, group.up, group.down[rank], group.results)
            group.processes.append(context.Process(target=_ours_worker, args=arguments, daemon=True))
        elif name == "gloo":
            port = group.__dict__.setdefault("port", free_port())
            arguments = (*common, port, 1 + settings.rounds, group.results)
            group.processes.append(context.Process(target=_gloo_worker, args=arguments, daemon=True))
        else:  # not daemons: hivemind's averager and DHT are child processes
            arguments = (*common, group.up, group.down[rank], 1 + settings.hivemind_rounds, group.results)
            group.processes.append(context.Process(target=_hivemind_worker, args=arguments))
    for process in group.processes:
        process.start()
    if name == "ours":
        addresses: dict[str, list] = {variant: [] for variant in OURS}
        for _ in range(len(OURS) * peers):
            rank, variant, address, key = group.get(group.up)
            addresses[variant].append((rank, address, key))
        plan = [(variant, index) for index in range(1 + settings.rounds) for variant in OURS]
        if settings.kill:
            plan.append(("kill", 0))
        for queue in group.down:
            queue.put({variant: sorted(entries) for variant, entries in addresses.items()})
            queue.put(plan)
    elif name == "hivemind":  # member 0 starts the DHT, the others join it
        group.down[0].put([])
        initial_peers = group.get(group.up)
        for queue in group.down[1:]:
            queue.put(initial_peers)
    return group


def _run_group(group: _Group, settings: Settings, measured: dict[str, SystemRounds]) -> None:
    def plain_round():
        group.wait()
        return group.collect()

    def hivemind_round():
        group.wait()  # start matchmaking
        group.wait()  # every member has its group: run the all-reduce
        return group.collect()

    if group.name == "ours":
        for _ in range(1 + settings.rounds):
            for variant in OURS:  # the variants take turns, round by round
                _measure(measured, variant, plain_round)
        if settings.kill:
            group.wait()
            measured["kill"] = SystemRounds(rounds=[group.collect(settings.peers - 1)])
    elif group.name == "gloo":
        for _ in range(1 + settings.rounds):
            _measure(measured, "gloo", plain_round)
    else:
        for _ in range(1 + settings.hivemind_rounds):
            _measure(measured, "hivemind", hivemind_round)
    group.processes = [p for p in group.processes if p.exitcode is None]  # less the killed member
    group.wait()  # members may now close their endpoints
    _join_all(group.processes, timeout=10)  # hivemind shuts down slowly; killed below


def _join_all(processes, timeout: float) -> None:
    """Waits up to ``timeout`` for ``processes`` to exit.

    Checks exit codes (waitpid) between short waits on the sentinels: an exited member's
    sentinel was seen to stay unreadable here, which made ``join`` sit out its timeout.
    """
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if p.exitcode is None]) and time.monotonic() < deadline:
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.1)


def run(settings: Settings) -> dict[str, SystemRounds]:
    """Runs each system's set of processes in turn (one set at a time bounds the memory used)."""
    context = mp.get_context("spawn")
    measured: dict[str, SystemRounds] = {}
    for name in settings.systems:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        group, started = None, time.perf_counter()
        try:
            group = _start_group(context, name, settings)
            _run_group(group, settings, measured)
        finally:
            for process in group.processes if group else ():
                if process.is_alive():
                    process.kill()
        print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return measured


def report(settings: Settings, measured: dict[str, SystemRounds]) -> None:
    print(
        f"vector: {settings.numel} float32 = {settings.vector_bytes / 1e6:.1f} MB, {settings.peers} peers, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min) at the end"
    )
    print(f"{'system':<12} {'round s':>9} {'GB/s':>7} {'MB sent/member':>15} {'steal %':>8}  notes")
    throughput = {}
    for name, rounds in measured.items():
        if name == "kill":
            continue
        timed = rounds.rounds[1:]
        seconds = median([max(r.seconds for r in reports) for reports in timed])
        sent = median([max(r.bytes_sent for r in reports) for reports in timed])
        throughput[name] = settings.vector_bytes / seconds
        steal = 100 * rounds.steal_jiffies / rounds.total_jiffies if rounds.total_jiffies else 0.0
        identical = all(len({r.digest for r in reports}) == 1 for reports in rounds.rounds)
        error = max(_check_mean(reports) for reports in rounds.rounds)
        notes = [f"rounds {', '.join(f'{max(r.seconds for r in reports):.2f}' for reports in timed)}"]
        notes.append("bit-identical" if identical else "members DIFFER")
        notes.append(f"max |err| {error:.1e}")
        if name == "hivemind":
            notes.append(
                f"matchmaking {median([max(r.matchmaking for r in reports) for reports in timed]):.2f} s"
            )
        if name in ("gloo", "hivemind"):
            notes.append("bytes by formula")
        if name == "ours":
            notes.append(f"swarm train defaults: {OURS['ours'][1]}, CURVE on, {OURS['ours'][2]}")
        if name == "ours-plain":
            notes.append("fp32, CURVE off")
        if name == "ours-mean":
            notes.append("fp32, weighted mean instead of CenteredClip")
        if name == "ours-nocurve":
            notes.append("defaults, CURVE off: the bound for any cipher")
        if name == "ours-bare":
            notes.append(f"{OURS['ours-bare'][1]}, CURVE off, weighted mean, no backups")
        print(
            f"{name:<12} {seconds:>9.3f} {throughput[name] / 1e9:>7.3f} {sent / 1e6:>15.1f} {steal:>8.1f}  "
            + "; ".join(notes)
        )
    if "kill" in measured:
        reports = measured["kill"].rounds[0]
        identical = len({r.digest for r in reports}) == 1
        print(
            f"kill: member {settings.peers - 1} SIGKILLed at its first 'result'; {len(reports)} survivors, "
            f"round {max(r.seconds for r in reports):.2f} s (scatter+gather deadlines "
            f"{2 * settings.kill_deadline:.0f} s), repaired parts "
            f"{sorted({p for r in reports for p in r.extra['repaired']})}, "
            f"{'bit-identical' if identical else 'DIFFER'}"
        )

    def ratio(baseline: str, ours: str = "ours") -> str:
        if ours not in throughput or baseline not in throughput:
            return "nan"
        return f"{throughput[ours] / throughput[baseline]:.2f}"

    if "ours-mean" in throughput:
        print(
            f"like for like (weighted mean, CURVE on): vs_gloo={ratio('gloo', 'ours-mean')} "
            f"vs_hivemind={ratio('hivemind', 'ours-mean')}"
        )
    print(f"allreduce peers={settings.peers} vs_gloo={ratio('gloo')} vs_hivemind={ratio('hivemind')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 timed rounds of ours and gloo, 2 of hivemind, no kill round (< 120 s)",
    )
    parser.add_argument("--peers", type=int, default=Settings.peers)
    parser.add_argument("--megabytes", type=float, default=Settings.megabytes)
    parser.add_argument(
        "--systems", default=",".join(Settings.systems), help="comma-separated subset of ours,gloo,hivemind"
    )
    args = parser.parse_args()
    systems = tuple(args.systems.split(","))
    if not set(systems) <= set(Settings.systems):
        parser.error(f"--systems must name some of {','.join(Settings.systems)}")
    if args.quick:
        settings = Settings(args.peers, args.megabytes, 3, 2, kill=False, systems=systems)
    else:
        settings = Settings(args.peers, args.megabytes, 5, 3, kill="ours" in systems, systems=systems)
    # On SIGTERM (e.g. `timeout`), unwind through run()'s cleanup so no member process is orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    measured = run(settings)
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")
    report(settings, measured)


if __name__ == "__main__":
    main()

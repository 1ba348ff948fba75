"""Inference benchmark: local generation vs generation through 3 `swarm join` servers.

Same checkpoint (12 blocks of width 1024, random with init std 0.02), the same greedy
tokens, both measured in the same run, interleaved A B A B, every process (the local
baseline and each server) with the same torch thread count; CPU steal from
/proc/stat and the load average are recorded next to the numbers.

Why one thread by default: this machine has 2 cores shared with other work. With 2
intra-op threads per process, every matmul ends in an OpenMP barrier that waits for
a thread the scheduler has parked, and a token costs 3-10x more at random (the old
benchmark's local baseline ran like that and came out 4x *slower* than the swarm).

``--quick`` measures only the loopback comparison. Full mode adds

* emulated links (20 ms and 100 ms round trip, 100 Mbit/s), emulated inside the
  transport (``SWARM_EMULATE_LINK``, ``transport/link_emulation.py``): the servers and
  the client each hold every message they receive for the one-way latency plus its
  transfer time, so client -> server, the server -> server pushes and the replies each
  cross one emulated link, with no proxy in the way (a user-space proxy cost ~2 ms of its
  own per leg here). Reported against the floor: local compute (measured interleaved with
  the swarm runs on that link) + (servers + 1) one-way latencies + one token's transfer
  per leg (client -> s1 -> s2 -> s3 -> client); ``--wan-only`` runs only this table.
  Its "bare chain" row runs the same three spans in plain processes over OS pipes
  (``benchmarks/_process_chain.py``): what process hand-offs cost on this machine
  with no swarm code at all, interleaved with local runs;
* the batching gain: tokens/s of 16 concurrent sessions vs 1 on one server holding
  every block.

The last line is machine-readable (loopback)::

    inference servers=3 local_ms_per_token=<f> swarm_ms_per_token=<f> overhead_ms_per_hop=<f> ttft_ms=<f> local_ttft_ms=<f>

``ttft_ms``: from asking for a generation (a new session: its route opened from the
client's live view of the servers) to holding its first token, after a warm-up run;
``local_ttft_ms``: the same prompt's prefill and first token locally (medians of 8
interleaved pairs per repeat, in alternating order; the pair-by-pair difference is printed too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
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
INIT_STD = 0.02  # GPT-2 / Llama init; 0.1 makes activations grow block after block
LINKS = ((20.0, 100.0), (100.0, 100.0))  # (round trip ms, Mbit/s) emulated in full mode
BATCH_SESSIONS = 16
PINGS = 10  # pings per server for the measured link round trip
# First-token pairs per repeat, 40 in --quick: with 15, the medians moved by more than the
# +15 ms goal's margin from run to run on the 2-core VM (local 81-110 ms); a pair costs ~0.2 s.
TTFT_SAMPLES = 8


@dataclasses.dataclass
class _Setup:
    checkpoint: Path
    tmp_path: Path
    peers: list[str]
    threads: int
    group: object  # ProcessGroup


# Local baseline and the swarm runs.


def _time_local(model, prompt: torch.Tensor, new_tokens: int) -> float:
    from kernels import generate

    started = time.perf_counter()
    generate(model, prompt, new_tokens)
    return (time.perf_counter() - started) * 1000 / new_tokens


async def _time_swarm(remote, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    output = await remote.generate(prompt, new_tokens)
    return (time.perf_counter() - started) * 1000 / new_tokens, output


async def _swarm_ttft(remote, prompt: torch.Tensor) -> float:
    """Milliseconds from asking for a generation to holding its first token (session opened)."""
    started = time.perf_counter()
    async for _ in remote.stream(prompt, 1):
        ttft = (time.perf_counter() - started) * 1000
    return ttft


async def _compare(checkpoint, peers, local, prompt, tokens: int, repeats: int):
    """Interleaved local / swarm runs -> (local ms per token, swarm ms per token, outputs equal,
    local ms to the first token, swarm ms to the first token)."""
    from kernels import generate
    from swarm.serving import RemoteModel

    local_ms, swarm_ms, local_ttft, swarm_ttft = [], [], [], []
    async with RemoteModel.connect(checkpoint, peers) as remote:
        await remote.generate(prompt, 4)  # warm up connections and sessions
        _time_local(local, prompt, 4)
        for _ in range(repeats):  # interleaved A B A B
            local_ms.append(_time_local(local, prompt, tokens))
            ms, output = await _time_swarm(remote, prompt, tokens)
            swarm_ms.append(ms)
            for sample in range(TTFT_SAMPLES):  # a new session each: open + prefill + first token
                if sample % 2:  # A B, then B A: neither always runs right after the 64-token runs
                    swarm_ttft.append(await _swarm_ttft(remote, prompt))
                    local_ttft.append(_time_local(local, prompt, 1))
                else:
                    local_ttft.append(_time_local(local, prompt, 1))
                    swarm_ttft.append(await _swarm_ttft(remote, prompt))
        equal = torch.equal(output, generate(local, prompt, tokens))
    return local_ms, swarm_ms, equal, local_ttft, swarm_ttft


async def _time_remote(checkpoint, peers, local, prompt, tokens: int, repeats: int):
    """Interleaved local / swarm runs -> (local ms per token, swarm ms per token, the median round
    trip of a ping to the servers in ms: the link as the swarm sees it, servers' event loops included)."""
    from swarm.serving import RemoteModel

    async with RemoteModel.connect(checkpoint, peers) as remote:
        await remote.generate(prompt, 2)
        _time_local(local, prompt, 2)
        local_runs, runs = [], []
        for _ in range(repeats):  # A B A B: the floor's compute under the same load as the swarm's
            local_runs.append(_time_local(local, prompt, tokens))
            runs.append((await _time_swarm(remote, prompt, tokens))[0])
        pings = []
        for server in (await remote.servers.view()).values():
            connection = await remote.connection_to(server)
            pings += [await connection.ping(timeout=10) * 1000 for _ in range(PINGS)]
        return local_runs, runs, median(pings)


async def _batching_gain(checkpoint, peers, prompt, tokens: int) -> tuple[float, float, int]:
    """Tokens/s of 1 session and of ``BATCH_SESSIONS`` concurrent ones; and rows per forward."""
    from swarm.serving import RemoteModel
    from swarm.serving.protocol import StatsRequest

    async with RemoteModel.connect(checkpoint, peers) as remote:
        await remote.generate(prompt, 2)
        started = time.perf_counter()
        await remote.generate(prompt, tokens)
        single = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        await remote.generate([prompt] * BATCH_SESSIONS, tokens)
        many = BATCH_SESSIONS * tokens / (time.perf_counter() - started)
        (server,) = (await remote.list_servers()).values()
        stats = await (await remote.connection_to(server)).call(StatsRequest(), timeout=30)
    return single, many, stats.batched_steps


# Servers.


def _write_checkpoint(directory: Path, layers: int, hidden: int) -> None:
    from kernels.tiny import make_random_state, save_checkpoint, write_tiny_checkpoint

    config = write_tiny_checkpoint(directory, num_layers=layers, hidden_size=hidden, vocab_size=512)
    save_checkpoint(directory, config, make_random_state(config, seed=0, std=INIT_STD))


def _start_servers(setup: _Setup, name: str, spans: list[str], extra: list[list[str]] | None = None,
                   env: dict[str, str] | None = None):  # fmt: skip
    """One `swarm join` per span (``extra``: more flags for each; ``env``: added to the environment)."""
    processes = []
    for i, blocks in enumerate(spans):
        args = ["join", "--model", str(setup.checkpoint), "--blocks", blocks, "--initial-peers", *setup.peers,
                "--torch-threads", str(setup.threads), "--throughput-cache",
                str(setup.tmp_path / "throughput.json"), *(extra[i] if extra else [])]  # fmt: skip
        processes.append(setup.group.start(f"{name}{i}", args, env))
    for process in processes:
        process.wait_for_line("ONLINE", timeout=300)
    return processes


def _stop(processes) -> None:
    for process in processes:
        process.terminate(timeout=60)


def _chain_spans(layers: int) -> list[str]:
    bounds = [round(i * layers / SERVERS) for i in range(SERVERS + 1)]
    return [f"{bounds[i]}:{bounds[i + 1]}" for i in range(SERVERS)]


# Reports.


def _wan_rows(setup: _Setup, local, prompt, tokens: int, repeats: int) -> list[tuple]:
    """Per emulated link: (rtt ms, Mbit/s, ms/token, floor ms/token, measured rtt ms, floor on it,
    ms over the floor pair by pair, the bare process chain's ms over its floor on that link).

    Each link gets its own servers, started with ``SWARM_EMULATE_LINK`` set, and the client
    (this process) sets it too while it runs: every message, in every direction, waits."""
    from kernels import load_config
    from transport import EmulatedLink
    from transport.link_emulation import ENVIRONMENT_VARIABLE

    config = load_config(setup.checkpoint)
    message_bits = (config.hidden_size * 4 + 512) * 8  # one token's activations (float32) plus framing
    rows = []
    for rtt_ms, mbit in LINKS:
        link = EmulatedLink(rtt_ms / 2000, mbit * 1e6).to_environment()
        processes = _start_servers(setup, f"wan{rtt_ms:.0f}_", _chain_spans(config.num_layers),
                                   env={ENVIRONMENT_VARIABLE: link})  # fmt: skip
        os.environ[ENVIRONMENT_VARIABLE] = link  # the client's endpoint (made in connect) reads it
        try:
            local_runs, runs, measured_rtt = asyncio.run(
                _time_remote(setup.checkpoint, setup.peers, local, prompt, tokens, repeats)
            )
        finally:
            del os.environ[ENVIRONMENT_VARIABLE]
            _stop(processes)
        compute_ms = median(local_runs)
        legs = SERVERS + 1  # client -> s1 -> s2 -> s3 -> client
        transfer_ms = message_bits / (mbit * 1e6) * 1000
        floor = compute_ms + legs * (rtt_ms / 2 + transfer_ms)
        measured_floor = compute_ms + legs * (measured_rtt / 2 + transfer_ms)
        # the same per adjacent pair (swarm run - local run beside it): steadier when the
        # machine's load drifts between pairs
        paired = median([run - compute for run, compute in zip(runs, local_runs, strict=True)])
        paired -= legs * (rtt_ms / 2 + transfer_ms)
        print(f"{rtt_ms:.0f} ms RTT: local ms/token (runs) {[f'{v:.1f}' for v in local_runs]}, "
              f"swarm {[f'{v:.1f}' for v in runs]}")  # fmt: skip
        bare_local, bare_ms = _bare_chain(
            setup, local, prompt, tokens, repeats, (rtt_ms / 2 + transfer_ms) / 1000
        )
        bare_over = bare_ms - bare_local - legs * (rtt_ms / 2 + transfer_ms)
        rows.append((rtt_ms, mbit, median(runs), floor, measured_rtt, measured_floor, paired, bare_over))
    return rows


def _bare_chain(
    setup: _Setup, local, prompt, tokens: int, repeats: int, hold_s: float = 0.0
) -> tuple[float, float]:
    """(local ms/token, ms/token of the same spans in plain processes over pipes, each holding
    what it receives for ``hold_s``): medians of interleaved runs
    (``benchmarks/_process_chain.py``: what process hand-offs cost here)."""
    from benchmarks._process_chain import ProcessChain
    from kernels import load_config

    layers = load_config(setup.checkpoint).num_layers
    spans = [tuple(int(bound) for bound in span.split(":")) for span in _chain_spans(layers)]
    chain = ProcessChain(setup.checkpoint, spans, setup.threads, hold_s)
    try:
        chain.ms_per_token(prompt, 2)
        local_runs, chain_runs = [], []
        for _ in range(repeats):
            local_runs.append(_time_local(local, prompt, tokens))
            chain_runs.append(chain.ms_per_token(prompt, tokens))
    finally:
        chain.close()
    print(f"bare process chain, {hold_s * 1000:.2f} ms hold: local ms/token (runs) {[f'{v:.1f}' for v in local_runs]}, "
          f"chain {[f'{v:.1f}' for v in chain_runs]}")  # fmt: skip
    return median(local_runs), median(chain_runs)


def _print_wan(rows: list[tuple], loopback: tuple[float, float] | None, bare: tuple[float, float]) -> None:
    print(
        f"{'link':<22} {'ms/token':>9} {'floor':>9} {'over floor':>11} {'ping':>7} {'over floor on ping':>19}"
    )
    if loopback is not None:
        swarm_ms, local_ms = loopback
        print(f"{'loopback':<22} {swarm_ms:>9.1f} {local_ms:>9.1f} {swarm_ms - local_ms:>11.1f}")
    local_ms, chain_ms = bare
    print(f"{'bare chain, loopback':<22} {chain_ms:>9.1f} {local_ms:>9.1f} {chain_ms - local_ms:>11.1f}   "
          f"(no swarm code: plain processes over pipes)")  # fmt: skip
    for rtt_ms, mbit, ms, floor, measured_rtt, measured_floor, paired, bare_over in rows:
        link = f"{rtt_ms:.0f} ms RTT, {mbit:.0f} Mbit/s"
        print(f"{link:<22} {ms:>9.1f} {floor:>9.1f} {ms - floor:>11.1f} {measured_rtt:>7.1f} "
              f"{ms - measured_floor:>19.1f}   ({(ms / floor - 1) * 100:+.1f}% of the floor; "
              f"paired: {paired:+.1f} ms, {paired / floor * 100:+.1f}%; "
              f"bare chain on this link: {bare_over:+.1f} ms, {bare_over / floor * 100:+.1f}%)")  # fmt: skip
    print("floor = local compute (interleaved runs) + (servers + 1) one-way latencies + one token's")
    print("transfer per leg; paired = median over adjacent pairs of (swarm run - local run) minus the")
    print("legs, the same distance measured pair by pair;")
    print("ping = median round trip of a ping to the servers over the emulated link")
    print("(the link as measured, the servers' event loops included)")
    print("bare chain = the same spans in three plain processes handing activations over OS pipes,")
    print("no swarm code, no encryption (on a link: each holds what it receives for the one-way")
    print("time, a plain sleep): what process hand-offs cost on this machine by themselves (a")
    print("process woken on another, idle vCPU pays for the wake-up), part of every row's")
    print("distance from its floor here; servers on different machines do not pay it")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="loopback comparison only, 5 repeats")
    parser.add_argument(
        "--wan-only", action="store_true", help="only the emulated links' table (full mode's)"
    )
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per run (loopback)")
    parser.add_argument("--wan-tokens", type=int, default=16, help="tokens per run on emulated links")
    parser.add_argument("--wan-repeats", type=int, default=5, help="interleaved local/swarm runs per link")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of every process: the local baseline and each server (default 1, see above)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kernels import load_local_model
    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    repeats = 5 if args.quick else 7
    load_before = os.getloadavg()
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = tmp_path / "model"
        _write_checkpoint(checkpoint, args.layers, args.hidden)
        local = load_local_model(checkpoint)
        prompt = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
        bootstrap = SwarmDHT(
            Identity.generate(), DHTConfig(swarm_name="swarm", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
        )
        bootstrap.start()
        peers = [str(m) for m in bootstrap.visible_maddrs()]
        setup = _Setup(checkpoint, tmp_path, peers, args.threads, ProcessGroup(tmp_path))
        try:
            if args.wan_only:
                wan = _wan_rows(setup, local, prompt, args.wan_tokens, args.wan_repeats)
                bare = _bare_chain(setup, local, prompt, args.wan_tokens, args.wan_repeats)
            else:
                processes = _start_servers(setup, "server", _chain_spans(args.layers))
                with steal_meter(report):
                    local_ms, swarm_ms, equal, local_ttft, swarm_ttft = asyncio.run(
                        _compare(checkpoint, peers, local, prompt, args.tokens, repeats)
                    )
                _stop(processes)
            if not args.quick and not args.wan_only:
                wan = _wan_rows(setup, local, prompt, args.wan_tokens, args.wan_repeats)
                bare = _bare_chain(setup, local, prompt, args.tokens, repeats)
                (whole,) = _start_servers(setup, "whole", [f"0:{args.layers}"])
                single, many, batched = asyncio.run(_batching_gain(checkpoint, peers, prompt, args.tokens))
                _stop([whole])
        finally:
            setup.group.close()
            bootstrap.shutdown()
    load_after = os.getloadavg()
    if args.wan_only:
        _print_wan(wan, None, bare)
        print(f"threads per process: {args.threads}; load average before/after: "
              f"{load_before[0]:.2f}/{load_after[0]:.2f}")  # fmt: skip
        return
    local_median, swarm_median = median(local_ms), median(swarm_ms)
    overhead = (swarm_median - local_median) / SERVERS
    print(f"local ms/token (runs): {[f'{v:.1f}' for v in local_ms]}")
    print(f"swarm ms/token (runs): {[f'{v:.1f}' for v in swarm_ms]}")
    best_local, best_swarm = min(local_ms), min(swarm_ms)
    print(f"best of the runs (least disturbed by neighbours): local {best_local:.1f}, swarm "
          f"{best_swarm:.1f} -> {(best_swarm - best_local) / SERVERS:.2f} ms per hop")  # fmt: skip
    print(f"swarm tokens equal local tokens: {'yes' if equal else 'NO'}")
    print(f"time to first token, local ms (runs): {[f'{v:.1f}' for v in local_ttft]}")
    print(f"time to first token, swarm ms (runs): {[f'{v:.1f}' for v in swarm_ttft]}")
    paired = median([s - loc for s, loc in zip(swarm_ttft, local_ttft, strict=True)])
    print(
        f"time to first token, swarm minus local pair by pair (median of {len(swarm_ttft)}): {paired:+.1f} ms"
    )
    print(f"threads per process: {args.threads}; cpu steal during the loopback runs: "
          f"{report['steal_percent']:.1f}%; load average before/after: "
          f"{load_before[0]:.2f}/{load_after[0]:.2f}")  # fmt: skip
    if not args.quick:
        print()
        _print_wan(wan, (swarm_median, local_median), bare)
        print()
        print(f"one server, all {args.layers} blocks: 1 session {single:.1f} tokens/s, {BATCH_SESSIONS} "
              f"sessions {many:.1f} tokens/s (gain {many / single:.1f}x, {batched} steps batched)")  # fmt: skip
    print(
        f"inference servers={SERVERS} local_ms_per_token={local_median:.2f} "
        f"swarm_ms_per_token={swarm_median:.2f} overhead_ms_per_hop={overhead:.2f} "
        f"ttft_ms={median(swarm_ttft):.2f} local_ttft_ms={median(local_ttft):.2f}"
    )


if __name__ == "__main__":
    main()

"""Churn benchmark (issue #19): generations while servers are killed, hung and gone.

A swarm of real `swarm join` processes on 127.0.0.1 serving a tiny checkpoint: three
spans, two holders each. Three phases, one client (``RemoteModel``) throughout:

1. churn: concurrent generations (8 with ``--quick``) loop while a thread SIGKILLs a
   random server every few seconds and restarts it under the same identity, never
   both holders of a span at once. Every generation is compared with a local run
   (``failed``: raised; ``wrong``: other tokens).
2. hang: one generation; after a few tokens the main process of the server serving its
   middle span is SIGSTOPped. ``hang_stall_s`` is the longest gap between two tokens
   after that (the client's step deadline for that server plus the failover).
3. ghosts: the three servers that routes prefer (they announce a high throughput) are
   SIGKILLed, leaving three live records of dead servers; a new client's time to its
   first token is ``ghost_first_token_s``.

Goals: failed=0, wrong=0, hang_stall_s <= 5, ghost_first_token_s <= 2. The last line::

    churn generations=<n> failed=<n> wrong=<n> hang_stall_s=<f> ghost_first_token_s=<f>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # benchmarks/transport.py shadows transport

import torch

SPANS = {"a1": "0:1", "a2": "0:1", "b1": "1:2", "b2": "1:2", "c1": "2:3", "c2": "2:3"}
FAST = ("a1", "b1", "c1")
PROMPTS = [torch.tensor([[1, 17, 42, 99, 7, 300]]), torch.tensor([[5, 6, 7]]), torch.tensor([[250, 3, 3, 9]])]
NEW_TOKENS = 16
HANG_TOKENS = 32


def _flags(name: str) -> tuple[str, ...]:
    return ("--throughput", "1000000" if name in FAST else "100")


async def _churn_phase(swarm, loop, expected, workers: int, seconds: float) -> dict:
    counts = {"generations": 0, "failed": 0, "wrong": 0, "errors": []}

    async def worker(model, index: int, until: float) -> None:
        while time.monotonic() < until:
            prompt = PROMPTS[index % len(PROMPTS)]
            try:
                output = await model.generate(prompt, NEW_TOKENS)
            except Exception as error:  # the benchmark counts failures
                counts["failed"] += 1
                counts["errors"].append(f"{type(error).__name__}: {error}")
                continue
            counts["generations"] += 1
            want = expected[index % len(PROMPTS)][:, : prompt.shape[1] + NEW_TOKENS]
            counts["wrong"] += int(not torch.equal(output, want))

    async with await swarm.connect(listing=tuple(SPANS), route_wait=30.0, step_timeout=60.0) as model:
        churner = threading.Thread(target=loop.run, daemon=True)
        churner.start()
        try:
            until = time.monotonic() + seconds
            await asyncio.gather(*(worker(model, index, until) for index in range(workers)))
        finally:
            loop.stop.set()
            await asyncio.to_thread(churner.join, 300)
    return counts


async def _hang_phase(swarm, expected) -> tuple[float, bool]:
    async with await swarm.connect(listing=tuple(SPANS), step_timeout=60.0) as model:
        prompt = PROMPTS[0]
        async with model.inference_session(prompt.shape[1] + HANG_TOKENS) as session:
            victim = swarm.servers[swarm.name_of(session.route[1][0])]
            pieces, gaps, last = [], [], time.monotonic()
            try:
                async for piece in model.stream(prompt, HANG_TOKENS, session=session):
                    now = time.monotonic()
                    if len(pieces) >= 4:
                        gaps.append(now - last)
                    last = now
                    pieces.append(piece)
                    if len(pieces) == 4:
                        os.kill(victim.process.pid, signal.SIGSTOP)
            finally:
                os.kill(victim.process.pid, signal.SIGCONT)
        output = torch.cat([prompt, *pieces], dim=1)
        return max(gaps), torch.equal(output, expected[0][:, : output.shape[1]])


async def _ghost_phase(swarm, expected) -> tuple[float, bool]:
    for name in FAST:
        swarm.servers[name].kill()
    async with await swarm.connect(listing=FAST, route_wait=30.0) as model:
        started, first, pieces = time.monotonic(), None, []
        async for piece in model.stream(PROMPTS[1], NEW_TOKENS):
            first = first if first is not None else time.monotonic() - started
            pieces.append(piece)
        output = torch.cat([PROMPTS[1], *pieces], dim=1)
        return first, torch.equal(output, expected[1][:, : output.shape[1]])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about 2 minutes: 60 s of churn, 8 generations")
    parser.add_argument("--seconds", type=float, default=0.0, help="seconds of churn (default 60 quick, 300)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent generations during churn")
    parser.add_argument("--kill-period", type=float, default=5.0, help="mean seconds between kills")
    args = parser.parse_args()
    seconds = args.seconds or (60.0 if args.quick else 300.0)
    torch.set_num_threads(1)

    from kernels import generate, load_local_model
    from kernels.tiny import write_tiny_checkpoint
    from tests.harness import ChurnLoop, ServingSwarm

    with tempfile.TemporaryDirectory(prefix="swarm-churn-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = tmp_path / "model"
        write_tiny_checkpoint(checkpoint, num_layers=3, hidden_size=64)
        local = load_local_model(checkpoint)
        expected = [generate(local, prompt, HANG_TOKENS) for prompt in PROMPTS]
        with ServingSwarm(tmp_path, checkpoint) as swarm:
            loop = ChurnLoop(swarm, SPANS, {n: _flags(n) for n in SPANS}, period=args.kill_period, seed=19)
            for name in SPANS:
                loop.join_server(name)
            swarm.wait_online(*SPANS)
            started = time.monotonic()
            counts = asyncio.run(_churn_phase(swarm, loop, expected, args.workers, seconds))
            print(f"churn: {counts['generations']} generations in {seconds:.0f}s, {len(loop.kills)} kills "
                  f"({', '.join(loop.kills)}), failed={counts['failed']} wrong={counts['wrong']}", flush=True)  # fmt: skip
            for error in counts["errors"][:5]:
                print(f"  failure: {error}", flush=True)
            swarm.wait_online(*SPANS)
            stall, hang_ok = asyncio.run(_hang_phase(swarm, expected))
            print(
                f"hang: longest gap between tokens after SIGSTOP {stall:.2f}s, tokens equal: {hang_ok}",
                flush=True,
            )
            first, ghost_ok = asyncio.run(_ghost_phase(swarm, expected))
            print(
                f"ghosts: first token after {first:.2f}s with 3 dead records, tokens equal: {ghost_ok}",
                flush=True,
            )
            print(
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {time.monotonic() - started:.0f}s"
            )
    wrong = counts["wrong"] + int(not hang_ok) + int(not ghost_ok)
    print(
        f"churn generations={counts['generations'] + 2} failed={counts['failed']} wrong={wrong} "
        f"hang_stall_s={stall:.2f} ghost_first_token_s={first:.2f}"
    )


if __name__ == "__main__":
    main()

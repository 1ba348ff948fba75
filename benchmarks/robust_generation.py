"""The generation half of ``benchmarks/robust.py``: a lying server among three, spot checks on.

Three `swarm join` servers on 127.0.0.1 each hold every block of one random checkpoint;
``liar`` adds noise of 5% of each output vector's norm from its sessions' step
``LIE_AFTER + 1`` on (``--perturb-outputs``) and announces a high throughput, so clients
route through it. Measured in one run:

- ``detected_within_steps``: with ``verify_fraction`` at its recommended value
  (``RECOMMENDED_VERIFY_FRACTION``), a session through the liar runs until the client
  raises ``ServerMisbehaved``; the steps from the liar's first wrong output to that
  moment (the wrong one counted), worst of ``trials`` sessions (the checks are drawn at
  random, so this varies from trial to trial);
- ``verify_overhead_ratio``: ms per token of a greedy generation through an honest server
  with spot checks on (the other honest server checks) over the same without, interleaved
  A B A B, median of each. Everything shares this machine's cores: a check's
  recomputation competes with the generation for CPU, as it would not across machines.
  Also printed: CPU ms per token of the client and the servers together, which the
  neighbours' load does not move as it moves wall time.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import torch

LIE_AFTER = 4  # the liar is honest for its sessions' first steps (prefill and 3 tokens)
PERTURBATION = "0.05"


async def _steps_until_caught(model, prompt: torch.Tensor, tokens: int, liar: str) -> int:
    """Steps from the liar's first wrong output until the client notices (the wrong one counted)."""
    from swarm.serving.spot_checks import ServerMisbehaved

    model.bans.forgive(liar)
    async with model.inference_session(prompt.shape[1] + tokens) as session:
        if [peer for peer, _ in session.route] != [liar]:
            raise RuntimeError(f"the route avoided the liar: {session.route}")
        try:
            await model.generate(prompt, tokens, session=session)
        except ServerMisbehaved:
            return session._step - LIE_AFTER
    raise RuntimeError(f"the liar was not caught within {tokens} tokens")


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) this process and ``pids`` used so far (Linux /proc; others: 0)."""
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


async def _ms_per_token(model, prompt: torch.Tensor, tokens: int, pids: list[int]) -> tuple[float, float]:
    """(wall ms, CPU ms of the client and the servers) per token of one generation."""
    started, cpu = time.perf_counter(), _cpu_seconds(pids)
    await model.generate(prompt, tokens)
    return (time.perf_counter() - started) * 1000 / tokens, (_cpu_seconds(pids) - cpu) * 1000 / tokens


async def _measure(
    checkpoint,
    peers,
    ids: dict[str, str],
    fraction: float,
    tokens: int,
    repeats: int,
    trials: int,
    pids: list[int],
):
    from swarm.serving import ClientConfig, RemoteModel

    prompt = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    plain_config, verified_config = ClientConfig(), ClientConfig(verify_fraction=fraction)
    async with (
        RemoteModel.connect(checkpoint, peers, config=plain_config) as plain,
        RemoteModel.connect(checkpoint, peers, config=verified_config) as verified,
    ):
        for model in (plain, verified):  # both wait for every server, then warm up
            while len(await model.list_servers()) < 3:
                await asyncio.sleep(0.5)
        detected = [await _steps_until_caught(verified, prompt, 64, ids["liar"]) for _ in range(trials)]
        for model in (plain, verified):  # the overhead is measured on honest routes
            for _ in range(32):
                if model.bans.ban(ids["liar"]) >= model.bans.max_seconds:
                    break
            await model.generate(prompt, 4)
        plain_ms, verified_ms = [], []  # (wall, CPU) per run
        for _ in range(repeats):
            plain_ms.append(await _ms_per_token(plain, prompt, tokens, pids))
            verified_ms.append(await _ms_per_token(verified, prompt, tokens, pids))
        same = torch.equal(await plain.generate(prompt, tokens), await verified.generate(prompt, tokens))
    return detected, plain_ms, verified_ms, same


def run_generation_part(
    tmp_path: Path, peers: list[str], group, *, quick: bool, fraction: float | None = None
) -> tuple[int, float]:
    """Starts the three servers, measures, stops them. Returns (detected_within_steps, overhead ratio)."""
    from kernels.tiny import make_random_state, save_checkpoint, write_tiny_checkpoint
    from swarm.serving.spot_checks import RECOMMENDED_VERIFY_FRACTION

    fraction = RECOMMENDED_VERIFY_FRACTION if fraction is None else fraction

    layers, hidden = (4, 256) if quick else (8, 512)
    tokens, repeats, trials = (64, 9, 5) if quick else (96, 11, 10)
    checkpoint = tmp_path / "generation-model"
    config = write_tiny_checkpoint(checkpoint, num_layers=layers, hidden_size=hidden, vocab_size=512)
    save_checkpoint(checkpoint, config, make_random_state(config, seed=0, std=0.02))
    common = ["--model", str(checkpoint), "--blocks", f"0:{layers}", "--initial-peers", *peers,
              "--torch-threads", "1", "--throughput-cache", str(tmp_path / "throughput.json")]  # fmt: skip
    flags = {
        "honest0": ["--throughput", "10"],
        "honest1": ["--throughput", "10"],
        "liar": [
            "--throughput",
            "1000000",
            "--perturb-outputs",
            PERTURBATION,
            "--perturb-after-steps",
            str(LIE_AFTER),
        ],
    }
    processes = {name: group.start(name, ["join", *common, *extra]) for name, extra in flags.items()}
    try:
        ids = {
            name: p.wait_for_line("ONLINE", timeout=300).strip().rsplit(" ", 1)[1]
            for name, p in processes.items()
        }
        pids = [process.process.pid for process in processes.values()]
        detected, plain_ms, verified_ms, same = asyncio.run(
            _measure(checkpoint, peers, ids, fraction, tokens, repeats, trials, pids)
        )
    finally:
        for process in processes.values():
            process.terminate(timeout=60)
    plain, verified = (statistics.median(wall for wall, _ in runs) for runs in (plain_ms, verified_ms))
    plain_cpu, verified_cpu = (statistics.median(cpu for _, cpu in runs) for runs in (plain_ms, verified_ms))
    print(f"generation: 3 servers holding {layers} blocks of width {hidden}, one perturbing its outputs by "
          f"{float(PERTURBATION):.0%} from its step {LIE_AFTER + 1}; verify_fraction={fraction}")  # fmt: skip
    print(f"  caught after (steps from the first wrong output, per trial): {detected}")
    print(f"  ms/token unverified (runs): {[f'{v:.1f}' for v, _ in plain_ms]}")
    print(f"  ms/token verified   (runs): {[f'{v:.1f}' for v, _ in verified_ms]}")
    print(f"  medians {plain:.1f} / {verified:.1f} ms per token; verified tokens equal unverified: "
          f"{'yes' if same else 'NO'}")  # fmt: skip
    # CPU time does not depend on what else runs on the machine as wall time does: on a
    # saturated machine the wall ratio tends to it, on an idle one the checker's share hides
    print(f"  CPU ms/token, client + servers (medians): {plain_cpu:.1f} / {verified_cpu:.1f} "
          f"(ratio {verified_cpu / plain_cpu:.3f})")  # fmt: skip
    return max(detected), verified / plain

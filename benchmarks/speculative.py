"""Speculative decoding benchmark: greedy code completion through 3 servers over an emulated slow link.

Prompts are cut from the standard library's sources (modules the model never saw), 64
greedy tokens each, through 3 `swarm join` servers (12 blocks of width 1024, as in
``benchmarks/inference.py``) that sit behind the user-space delaying proxy of
``benchmarks/_proxy.py`` (100 ms round trip, 100 Mbit/s: client -> s1 -> s2 -> s3 ->
client all cross it). Each prompt runs without and with prompt-lookup speculation,
interleaved A B A B, in one client; the tokens of both must be equal.

The checkpoint: a random-weight model drafts badly (its greedy output is noise that never
repeats its context), so the embeddings and LM head are fit to the token bigram statistics
of the tokenizer's training corpus (five stdlib modules: maximum likelihood, counted, with
add-half smoothing), scaled so that the 12 random blocks (init std 0.02, as in
``benchmarks/inference.py``) perturb but rarely override them. The servers compute every
block as usual. Such a model continues code the way a weak model does: plausible
next tokens that soon fall into repeating phrases, which prompt lookup then predicts.
The acceptance rate and tokens per pass are printed with the result.

The last line is machine-readable::

    speculative rtt_ms=100 plain_ms_per_token=<f> speculative_ms_per_token=<f> speedup=<f> tokens_equal=<yes|no>
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and benchmarks/transport.py and
# benchmarks/kernels.py would shadow the packages of the same names.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks._common import free_port, median, steal_meter
from benchmarks._proxy import proxy_main
from benchmarks.inference import INIT_STD, SERVERS, _chain_spans, _Setup, _start_servers, _stop

PROMPT_MODULES = ("functools.py", "contextlib.py", "dataclasses.py", "enum.py", "argparse.py", "typing.py")
PROMPT_TOKENS = 192
EMBEDDING_RMS = 8.0  # the random blocks add ~0.5 RMS each to the residual: the bigram signal stays ahead


def _bigram_state(config, state: dict, tokenizer) -> None:
    """Sets embeddings, final norm and head to the corpus' bigram model (in place)."""
    from kernels.tiny import _CORPUS_MODULES

    stdlib = Path(os.__file__).parent
    vocab, hidden = config.vocab_size, config.hidden_size
    counts = torch.full((vocab, vocab), 0.5)  # (previous, next), add-half smoothing
    for name in _CORPUS_MODULES:
        ids = torch.tensor(tokenizer.encode(stdlib.joinpath(name).read_text(encoding="utf-8")).ids)
        counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
    log_probabilities = (counts / counts.sum(dim=1, keepdim=True)).log()  # (previous, next)
    generator = torch.Generator().manual_seed(1)
    # Unit token directions (orthonormal when hidden >= vocab, else nearly so): after the final
    # norm, token x's residual is ~ sqrt(hidden) * basis[x].
    if hidden >= vocab:
        basis = torch.linalg.qr(torch.randn(hidden, vocab, generator=generator)).Q.T  # (vocab, hidden)
    else:
        basis = torch.nn.functional.normalize(torch.randn(vocab, hidden, generator=generator), dim=1)
    state["model.embed_tokens.weight"] = basis * EMBEDDING_RMS * hidden**0.5
    state["model.norm.weight"] = torch.ones(hidden)
    # logits[next] = head[next] . (sqrt(hidden) * basis[x]) = log P(next | x)
    state["lm_head.weight"] = log_probabilities.T @ basis / hidden**0.5  # (vocab, hidden)


def write_checkpoint(directory: Path, layers: int, hidden: int) -> None:
    from tokenizers import Tokenizer

    from kernels.tiny import make_random_state, save_checkpoint, write_tiny_checkpoint

    config = write_tiny_checkpoint(directory, num_layers=layers, hidden_size=hidden, vocab_size=512)
    state = make_random_state(config, seed=0, std=INIT_STD)
    _bigram_state(config, state, Tokenizer.from_file(str(directory / "tokenizer.json")))
    save_checkpoint(directory, config, state)


def cut_prompts(tokenizer, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` prompts of ``PROMPT_TOKENS`` tokens, each ending at the start of a line of a
    stdlib module the model did not see."""
    stdlib = Path(os.__file__).parent
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        text = stdlib.joinpath(PROMPT_MODULES[index % len(PROMPT_MODULES)]).read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        end = rng.randrange(len(lines) // 4, len(lines))
        ids = tokenizer.encode("".join(lines[:end])).ids
        prompts.append(torch.tensor([ids[-PROMPT_TOKENS:]], dtype=torch.int64))
    return prompts


async def _generate(model, prompt: torch.Tensor, tokens: int, speculative: str | None):
    """(ms per token, output, passes along the chain)."""
    started = time.perf_counter()
    async with model.inference_session(prompt.shape[1] + tokens) as session:
        output = await model.generate(prompt, tokens, session=session, speculative=speculative)
        passes = session._step
    return (time.perf_counter() - started) * 1000 / tokens, output, passes


async def _compare(checkpoint, peers, prompts, tokens: int):
    from swarm.serving import RemoteModel

    plain_ms, speculative_ms, passes, equal = [], [], [], True
    async with RemoteModel.connect(checkpoint, peers) as model:
        await model.generate(prompts[0][:, :8], 2)  # warm up connections
        for prompt in prompts:  # interleaved A B A B
            ms, plain, _ = await _generate(model, prompt, tokens, None)
            plain_ms.append(ms)
            ms, drafted, count = await _generate(model, prompt, tokens, "lookup")
            speculative_ms.append(ms)
            passes.append(count)
            equal &= torch.equal(plain, drafted)
    return plain_ms, speculative_ms, passes, equal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 prompts instead of 12")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--rtt-ms", type=float, default=100.0, help="emulated round trip (ms)")
    parser.add_argument("--mbit", type=float, default=100.0, help="emulated bandwidth (Mbit/s)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server (see inference.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    load_before = os.getloadavg()
    report: dict = {}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = tmp_path / "model"
        write_checkpoint(checkpoint, args.layers, args.hidden)
        prompts = cut_prompts(
            Tokenizer.from_file(str(checkpoint / "tokenizer.json")), 4 if args.quick else 12
        )
        one_way, bits_per_second = context.Value("d", args.rtt_ms / 2000), context.Value("d", args.mbit * 1e6)
        routes = [(f"127.0.0.{i + 2}", free_port()) for i in range(SERVERS)]
        ready = context.Event()
        proxy = context.Process(
            target=proxy_main, args=(routes, one_way, bits_per_second, ready), daemon=True
        )
        proxy.start()
        bootstrap = SwarmDHT(
            Identity.generate(), DHTConfig(swarm_name="swarm", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
        )
        bootstrap.start()
        peers = [str(m) for m in bootstrap.visible_maddrs()]
        setup = _Setup(checkpoint, tmp_path, peers, args.threads, ProcessGroup(tmp_path))
        try:
            if not ready.wait(60):
                raise RuntimeError("the link-emulating proxy did not start")
            extra = [["--port", str(port), "--announce-host", host] for host, port in routes]
            processes = _start_servers(setup, "server", _chain_spans(args.layers), extra)
            with steal_meter(report):
                plain_ms, speculative_ms, passes, equal = asyncio.run(
                    _compare(checkpoint, peers, prompts, args.tokens)
                )
            _stop(processes)
        finally:
            setup.group.close()
            bootstrap.shutdown()
            proxy.terminate()
            proxy.join(10)
    plain, speculative = median(plain_ms), median(speculative_ms)
    print(f"plain ms/token (per prompt): {[f'{v:.1f}' for v in plain_ms]}")
    print(f"speculative ms/token (per prompt): {[f'{v:.1f}' for v in speculative_ms]}")
    print(f"passes along the chain per {args.tokens} tokens with speculation (prefill included): {passes}; "
          f"{args.tokens / median(passes):.2f} tokens per pass (median)")  # fmt: skip
    load_after = os.getloadavg()
    print(f"threads per server: {args.threads}; cpu steal: {report['steal_percent']:.1f}%; "
          f"load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f}")  # fmt: skip
    print(
        f"speculative rtt_ms={args.rtt_ms:.0f} plain_ms_per_token={plain:.2f} "
        f"speculative_ms_per_token={speculative:.2f} speedup={plain / speculative:.2f} "
        f"tokens_equal={'yes' if equal else 'no'}"
    )


if __name__ == "__main__":
    main()

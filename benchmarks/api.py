"""API benchmark: a chat completion through `swarm api` (streaming, the openai package) vs
the same completion through ``RemoteModel`` directly, on the same 3-server swarm.

Same checkpoint (random, 6 blocks of width 256, a chat template), the same 64-token
greedy chat completion, measured in the same run, interleaved A B A B. Time to first
token is from sending the request to the first generated text (API) or token (direct);
the per-token time is the rest of the answer divided by its remaining tokens. The
overhead per token is the API's per-token time minus the direct one: what the HTTP
layer, JSON chunks and server-sent events add to each token. Every process runs with
one torch thread; CPU steal and the load average are printed with the numbers.

The last line is machine-readable::

    api ttft_ms=<f> direct_ttft_ms=<f> overhead_ms_per_token=<f>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # benchmarks/kernels.py must not shadow kernels

from benchmarks._common import median, steal_meter

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
MESSAGES = [{"role": "user", "content": "Tell me about swarms of bees and how they find a new home."}]
TOKENS = 64
SPANS = ("0:2", "2:4", "4:6")


async def _through_api(client, model_name: str) -> tuple[float, float, int, str]:
    """(ttft ms, ms per later token, tokens, text) of one streamed chat completion."""
    started = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = await client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=TOKENS,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
    ended = time.perf_counter()
    return (first - started) * 1000, (ended - first) * 1000 / max(tokens - 1, 1), tokens, "".join(text)


async def _direct(model) -> tuple[float, float, int, str]:
    """The same completion with ``RemoteModel`` in this process."""
    started = time.perf_counter()
    first, ids = None, []
    async for step in model.stream(model.chat_prompt(MESSAGES), TOKENS):  # (1, 1) ids
        first = first or time.perf_counter()
        ids.append(int(step[0, 0]))
    ended = time.perf_counter()
    text = model.decode([i for i in ids if i not in model.eos_token_ids])
    return (first - started) * 1000, (ended - first) * 1000 / max(len(ids) - 1, 1), len(ids), text


async def _compare(checkpoint: Path, peers: list[str], url: str, repeats: int) -> dict:
    from openai import AsyncOpenAI

    from swarm.serving import RemoteModel

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300)
    rows = {"api": [], "direct": []}
    async with RemoteModel.connect(checkpoint, peers) as model:
        await _through_api(client, "bench")  # warm up: connections, sessions, first-call costs
        await _direct(model)
        for _ in range(repeats):  # interleaved A B A B
            rows["api"].append(await _through_api(client, "bench"))
            rows["direct"].append(await _direct(model))
    await client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 interleaved pairs instead of 10")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10

    from kernels.tiny import make_random_state, save_checkpoint, write_tiny_checkpoint
    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    work = Path(tempfile.mkdtemp(prefix="swarm-bench-api-"))
    checkpoint = work / "model"
    config = write_tiny_checkpoint(checkpoint, num_layers=6, hidden_size=256, chat_template=TEMPLATE)
    save_checkpoint(checkpoint, config, make_random_state(config, seed=0, std=0.02))
    bootstrap = SwarmDHT(Identity.generate(), DHTConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
    bootstrap.start()
    peers = [str(m) for m in bootstrap.visible_maddrs()]
    group = ProcessGroup(work)
    report: dict = {}
    try:
        servers = [group.start(f"server{i}", [
            "join", "--model", str(checkpoint), "--blocks", span, "--initial-peers", *peers,
            "--torch-threads", "1", "--throughput-cache", str(work / "throughput.json"),
        ]) for i, span in enumerate(SPANS)]  # fmt: skip
        api = group.start("api", ["api", "--model", str(checkpoint), "--initial-peers", *peers, "--port", "0",
                                  "--model-name", "bench"], env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        for server in servers:
            server.wait_for_line("ONLINE", timeout=300)
        url = api.wait_for_line("API ready at", timeout=300).split("API ready at ", 1)[1].split()[0]
        import torch

        torch.set_num_threads(1)
        with steal_meter(report):
            rows = asyncio.run(_compare(checkpoint, peers, url, repeats))
    finally:
        group.close()
        bootstrap.shutdown()
    api_rows, direct_rows = rows["api"], rows["direct"]
    same = all(a[3] == d[3] for a, d in zip(api_rows, direct_rows, strict=True))
    print(f"3 servers {', '.join(SPANS)} of a 6-block width-256 model; {TOKENS}-token greedy chat completion; "
          f"{repeats} interleaved pairs; steal {report['steal_percent']:.1f}%, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'path':<8} {'ttft_ms':>10} {'ms/token':>10} {'tokens':>7}")
    for name, got in (("api", api_rows), ("direct", direct_rows)):
        print(f"{name:<8} {median([r[0] for r in got]):10.2f} {median([r[1] for r in got]):10.2f} "
              f"{median([r[2] for r in got]):7.0f}")  # fmt: skip
    print(f"same text through both paths: {same}")
    overhead = median([r[1] for r in api_rows]) - median([r[1] for r in direct_rows])
    print(f"api ttft_ms={median([r[0] for r in api_rows]):.2f} direct_ttft_ms={median([r[0] for r in direct_rows]):.2f} "
          f"overhead_ms_per_token={overhead:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

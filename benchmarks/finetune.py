"""Fine-tuning benchmark: one LoRA training step locally vs through 3 `swarm join` servers.

The checkpoint of ``benchmarks/inference.py`` (12 blocks of width 1024, random with
init std 0.02); LoRA rank 8 on q and v; a batch of ``--batch`` rows of ``--seq-len``
tokens; one step is forward + next-token loss + backward (the gradients of the
adapters). Local and swarm steps are interleaved A B A B in the same run, every process
(the local baseline and each server) with the same torch thread count (one by default:
see ``benchmarks/inference.py`` on why); the gradients of both are compared. CPU steal
and the load average are printed next to the numbers: the machine may be shared.

The servers keep each forward's activations for its backward (``SpanForward.keep``), so
a swarm step computes what a local one does; the rest is the transfers (activations
and gradients, float32, once per hop each way) and the hops' round trips.

The last line is machine-readable::

    finetune servers=3 local_ms_per_step=<f> swarm_ms_per_step=<f> overhead_ratio=<f>
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F

from benchmarks._common import median, steal_meter

SERVERS = 3
INIT_STD = 0.02  # as benchmarks/inference.py


def _loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def _step(forward, adapters, rows) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward + backward; (milliseconds, gradients)."""
    adapters.zero_grad(set_to_none=True)
    started = time.perf_counter()
    _loss(forward(rows, adapters), rows).backward()
    ms = (time.perf_counter() - started) * 1000
    return ms, {name: p.grad.clone() for name, p in adapters.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 interleaved repeats (default 9)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.inference import _chain_spans, _Setup, _start_servers, _stop, _write_checkpoint
    from kernels import load_local_model
    from kernels.lora import LoraAdapters, LoraConfig, local_forward
    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity
    from swarm.serving.remote_training import connect_in_thread

    repeats = 5 if args.quick else 9
    load_before = os.getloadavg()
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = tmp_path / "model"
        _write_checkpoint(checkpoint, args.layers, args.hidden)
        local = load_local_model(checkpoint)
        local.requires_grad_(False)
        adapters = LoraAdapters(local.config, LoraConfig(rank=8, targets=("q", "v")), init_b_std=0.01)
        rows = torch.randint(
            0, local.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)
        )
        bootstrap = SwarmDHT(
            Identity.generate(), DHTConfig(swarm_name="swarm", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
        )
        bootstrap.start()
        peers = [str(m) for m in bootstrap.visible_maddrs()]
        setup = _Setup(checkpoint, tmp_path, peers, args.threads, ProcessGroup(tmp_path))
        try:
            processes = _start_servers(setup, "server", _chain_spans(args.layers))
            with connect_in_thread(checkpoint, peers) as client:
                remote = client.model.forward
                deadline = time.monotonic() + 60
                while len(client.run(client.model.list_servers())) < SERVERS:  # polling under a deadline
                    if time.monotonic() > deadline:
                        raise RuntimeError("the client never listed the servers")
                    time.sleep(0.5)
                _step(lambda ids, a: local_forward(local, ids, a), adapters, rows)  # warm up both
                _step(lambda ids, a: remote(ids, adapters=a), adapters, rows)
                local_ms, swarm_ms = [], []
                with steal_meter(report):
                    for _ in range(repeats):  # interleaved A B A B
                        ms, local_grads = _step(lambda ids, a: local_forward(local, ids, a), adapters, rows)
                        local_ms.append(ms)
                        ms, swarm_grads = _step(lambda ids, a: remote(ids, adapters=a), adapters, rows)
                        swarm_ms.append(ms)
                reused = client.model.training.client.reused_forwards
                hops = len(client.model.training.last_route)
            _stop(processes)
        finally:
            setup.group.close()
            bootstrap.shutdown()
    error = max((local_grads[n] - swarm_grads[n]).abs().max().item() for n in local_grads)
    local_median, swarm_median = median(local_ms), median(swarm_ms)
    print(
        f"tokens per step: {args.batch * args.seq_len}; LoRA rank 8 on q,v; {args.layers} blocks of width {args.hidden}"
    )
    print(f"local ms/step (runs): {[f'{v:.0f}' for v in local_ms]}")
    print(f"swarm ms/step (runs): {[f'{v:.0f}' for v in swarm_ms]}")
    print(
        f"best of the runs: local {min(local_ms):.0f}, swarm {min(swarm_ms):.0f} -> ratio {min(swarm_ms) / min(local_ms):.2f}"
    )
    print(f"hops {hops}; backwards that reused the kept forward: {reused}; max |grad difference| {error:.2e}")
    load_after = os.getloadavg()
    print(f"threads per process: {args.threads}; cpu steal: {report['steal_percent']:.1f}%; load average "
          f"before/after: {load_before[0]:.2f}/{load_after[0]:.2f}")  # fmt: skip
    print(
        f"finetune servers={SERVERS} local_ms_per_step={local_median:.2f} "
        f"swarm_ms_per_step={swarm_median:.2f} overhead_ratio={swarm_median / local_median:.3f}"
    )


if __name__ == "__main__":
    main()

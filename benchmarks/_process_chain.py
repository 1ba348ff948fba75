"""What a chain of processes costs on this machine by itself: the inference benchmark's three
spans in three plain processes that hand activations on over OS pipes (no swarm code, no
encryption, no event loop), timed against local generation in the same run, on loopback or
holding each activation for an emulated link's one-way time (a plain sleep).

On the 2-core development VM this bare chain was 7-13 ms per token slower than one process
(3.3 ms with every process pinned to one core): a process woken on the other, halted vCPU
pays for the wake-up, which a swarm whose servers are different machines does not. It is
the part of the swarm's overhead here that no change to the swarm's code can remove.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import torch


def _serve(checkpoint: Path, start: int, end: int, threads: int, hold: float, inbox, outbox, ready) -> None:
    """Runs blocks [start, end) on every activation received, ``hold`` seconds after it came
    (an emulated link's one-way time, as the swarm's transport emulates it); b"reset" starts
    a new cache."""
    from kernels import load_blocks

    torch.set_num_threads(threads)
    span = load_blocks(checkpoint, start, end)
    hidden_size = span.config.hidden_size
    cache = None
    ready.put(start)
    with torch.inference_mode():
        while True:
            message = inbox.recv_bytes()
            if message == b"stop":
                outbox.send_bytes(message)
                return
            if message == b"reset":
                cache = span.allocate_cache(1, 1024)
                outbox.send_bytes(message)
                continue
            if hold:
                time.sleep(hold)
            hidden = torch.frombuffer(bytearray(message), dtype=torch.float32).view(1, -1, hidden_size)
            outbox.send_bytes(span(hidden, cache).numpy().tobytes())


class ProcessChain:
    """Three processes holding ``spans`` of ``checkpoint``; the caller holds embeddings and head.
    ``hold``: seconds every process (the caller too) holds each activation it receives."""

    def __init__(self, checkpoint: Path, spans: list[tuple[int, int]], threads: int, hold: float = 0.0):
        from kernels import load_client_pieces

        context = mp.get_context("spawn")
        links = [context.Pipe(duplex=False) for _ in range(len(spans) + 1)]  # (receive end, send end)
        ready = context.Queue()
        self.processes = [
            context.Process(target=_serve, args=(checkpoint, start, end, threads, hold, links[i][0], links[i + 1][1], ready),
                            daemon=True)
            for i, (start, end) in enumerate(spans)
        ]  # fmt: skip
        for process in self.processes:
            process.start()
        for _ in self.processes:
            ready.get(timeout=300)
        self.first, self.last = links[0][1], links[-1][0]
        self.client = load_client_pieces(checkpoint)
        self.hold = hold

    @torch.inference_mode()
    def ms_per_token(self, prompt: torch.Tensor, tokens: int) -> float:
        """Greedy generation of ``tokens`` through the chain, as generate() does locally."""
        self.first.send_bytes(b"reset")
        self.last.recv_bytes()
        step, size = prompt, self.client.config.hidden_size
        started = time.perf_counter()
        for _ in range(tokens):
            self.first.send_bytes(self.client.embed(step).numpy().tobytes())
            received = self.last.recv_bytes()
            if self.hold:
                time.sleep(self.hold)
            output = torch.frombuffer(bytearray(received), dtype=torch.float32).view(1, -1, size)
            step = self.client.logits(output)[:, -1].argmax(-1)[:, None]
        return (time.perf_counter() - started) * 1000 / tokens

    def close(self) -> None:
        self.first.send_bytes(b"stop")
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

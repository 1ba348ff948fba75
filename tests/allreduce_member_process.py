"""One all-reduce member as its own process, for tests that kill a member for real.

Run as ``python tests/allreduce_member_process.py RANK NUMEL CHUNK_BYTES DIE_AT_CHUNK``:
binds a CURVE endpoint on 127.0.0.1, prints ``{"address", "key"}`` as one JSON line,
reads the group (a JSON list of [address, key]) from one line of stdin, averages
``torch.randn(NUMEL)`` seeded by RANK (raw codec, the default robust rule, verified),
and prints ``{"digest", "contributors", "repaired"}``. With DIE_AT_CHUNK >= 0 the process
SIGKILLs itself as it is about to send that chunk of a contribution stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys


def member_vector(rank: int, numel: int):
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(100 + rank))


async def main(rank: int, numel: int, chunk_bytes: int, die_at_chunk: int) -> None:
    from swarm.training.allreduce import AllReduceTimeouts, Member
    from swarm.training.averaging import AveragingService
    from transport import Endpoint

    def before_send(send) -> None:
        if send.kind == "contribution" and send.chunk == die_at_chunk:
            os.kill(os.getpid(), signal.SIGKILL)

    endpoint = Endpoint()
    address = await endpoint.bind("tcp://127.0.0.1:0")
    service = AveragingService(
        endpoint, "none", registration_wait=20, before_send=before_send, chunk_bytes=chunk_bytes
    )
    print(json.dumps({"address": address, "key": endpoint.public_key.decode()}), flush=True)
    group = json.loads(await asyncio.to_thread(sys.stdin.readline))
    members = [Member(f"peer{i}", 1.0, a, k.encode()) for i, (a, k) in enumerate(group)]
    timeouts = AllReduceTimeouts(scatter=5, gather=5, repair=5, call=5)
    try:
        outcome = await service.all_reduce(
            "round-1", members, rank, member_vector(rank, numel), 1.0, timeouts
        )
        print(
            json.dumps(
                {
                    "digest": hashlib.sha256(outcome.averaged.numpy().tobytes()).hexdigest(),
                    "contributors": {str(k): v for k, v in outcome.report.contributors.items()},
                    "repaired": outcome.report.repaired_parts,
                }
            ),
            flush=True,
        )
        await asyncio.to_thread(sys.stdin.readline)  # stay up until every survivor is done
    finally:
        await service.close()
        await endpoint.close()


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    asyncio.run(main(*(int(argument) for argument in sys.argv[1:5])))

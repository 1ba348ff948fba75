"""The all-reduce's chunk streams: parts travel as many small messages (real ZeroMQ, CURVE on).

A chunked round must give the same bits as one that sends each part whole; a chunk that
overlaps or overruns what a sender already sent is refused; and a member SIGKILLed in
the middle of a contribution stream leaves a half-filled row that never counts, with
the survivors bit-identical.
"""

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarm.training.allreduce import AllReduceTimeouts, Member
from swarm.training.averaging import AveragingService
from swarm.training.parts import fallback_reducer, split_parts
from swarm.training.reduction import BufferPool, ChunkAssembly, PartState
from swarm.training.robust import RobustConfig
from swarm.training.robust_buffers import aggregate_buffered
from transport import EncodedTensor, Endpoint

pytestmark = pytest.mark.timeout(120)

TIMEOUTS = AllReduceTimeouts(scatter=5, gather=5, repair=5, call=5)
MEMBER = Path(__file__).with_name("allreduce_member_process.py")


def test_chunk_assembly_refuses_overlaps_and_overruns_and_completes_in_any_order():
    assembly = ChunkAssembly(10)
    assert not assembly.claim(4, 3)
    for offset, length in ((3, 2), (6, 1), (8, 3), (0, 0), (-1, 2)):
        with pytest.raises(ValueError):
            assembly.claim(offset, length)
    assert not assembly.claim(0, 4)
    assert assembly.claim(7, 3)


def test_a_part_state_counts_a_chunked_contribution_only_once_complete():
    state = PartState()
    state.add_chunk(1, 2.0, 4, torch.arange(4, 8, dtype=torch.float32), numel=8, members=3)
    assert not state.contributions
    with pytest.raises(ValueError, match="different weights"):
        state.add_chunk(1, 3.0, 0, torch.zeros(4), numel=8, members=3)
    state.add_chunk(1, 2.0, 0, torch.arange(4, dtype=torch.float32), numel=8, members=3)
    weight, values = state.contributions[1]
    assert weight == 2.0 and torch.equal(values, torch.arange(8, dtype=torch.float32))
    assert values.data_ptr() == state.buffer[1].data_ptr()  # in the round's buffer, not a copy


@contextlib.asynccontextmanager
async def _group(size, compression, chunk_bytes):
    """``size`` averaging services on real ZeroMQ endpoints (CURVE on): (services, members)."""
    endpoints, services, members = [], [], []
    try:
        for i in range(size):
            endpoint = Endpoint()
            endpoints.append(endpoint)
            address = await endpoint.bind("tcp://127.0.0.1:0")
            services.append(
                AveragingService(endpoint, compression, registration_wait=5, chunk_bytes=chunk_bytes)
            )
            members.append(Member(f"peer{i}", 1.0 + i, address, endpoint.public_key))
        yield services, members
    finally:
        for service in services:
            await service.close()
        for endpoint in endpoints:
            await endpoint.close()


async def _average(vectors, compression, chunk_bytes):
    async with _group(len(vectors), compression, chunk_bytes) as (services, members):
        return await asyncio.gather(
            *(services[i].all_reduce("r", members, i, v, 1.0 + i, TIMEOUTS) for i, v in enumerate(vectors))
        )


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_chunked_parts_give_the_same_bits_as_whole_ones(compression):
    generator = torch.Generator().manual_seed(3)
    vectors = [torch.randn(20_000, generator=generator) * (1 + i) for i in range(3)]
    whole = asyncio.run(_average(vectors, compression, chunk_bytes=2**20))
    chunked = asyncio.run(_average(vectors, compression, chunk_bytes=2048))  # ~500 values a chunk
    for outcome in chunked:
        assert torch.equal(outcome.averaged, whole[0].averaged)
        assert outcome.report.contributors == whole[0].report.contributors == {p: [0, 1, 2] for p in range(3)}
    # chunk boundaries on codec blocks: the bytes on the wire are the same too
    assert [o.bytes_sent for o in chunked] == [o.bytes_sent for o in whole]


def test_a_member_killed_mid_chunk_stream_leaves_the_survivors_bit_identical():
    numel, chunk_bytes, dying = 30_000, 4096, 2  # parts of ~10,000 values: 10 chunks of 1,024
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(MEMBER),
                str(rank),
                str(numel),
                str(chunk_bytes),
                str(3 if rank == dying else -1),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(3)
    ]
    try:
        group = [json.loads(child.stdout.readline()) for child in children]
        line = json.dumps([[g["address"], g["key"]] for g in group]) + "\n"
        for child in children:
            child.stdin.write(line)
            child.stdin.flush()
        assert children[dying].wait(timeout=60) == -9  # died as it sent its 4th chunk
        outcomes = [json.loads(children[rank].stdout.readline()) for rank in range(3) if rank != dying]
        for child in children:
            if child.poll() is None:
                child.stdin.write("done\n")
                child.stdin.flush()
                assert child.wait(timeout=30) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    assert outcomes[0]["digest"] == outcomes[1]["digest"]
    # no chunk stream of the dead member was complete: it counts nowhere
    assert all(outcome["contributors"] == {"0": [0, 1], "1": [0, 1], "2": [0, 1]} for outcome in outcomes)
    assert 2 in outcomes[0]["repaired"]  # member 0 backs up part 2 and took it over

    sys.path.insert(0, str(MEMBER.parent))
    from allreduce_member_process import member_vector

    survivors = {rank: member_vector(rank, numel) for rank in (0, 1)}
    parts = split_parts(numel, [1.0, 1.0, 1.0])
    # what every member computes (the reference's result within REFERENCE_TOLERANCE, see
    # test_training_robust_buffers.py), from the survivors' contributions only
    expected = torch.cat(
        [
            aggregate_buffered({r: (1.0, v[a:b]) for r, v in survivors.items()}, RobustConfig()).values
            for a, b in parts
        ]
    )
    assert hashlib.sha256(expected.numpy().tobytes()).hexdigest() == outcomes[0]["digest"]


def test_a_chunk_going_to_several_members_is_encoded_once_and_decodes_as_the_codec_does():
    from swarm.training.averaging_wire import COMPRESSIONS
    from swarm.training.chunk_streams import EncodedOnce

    class CountingCodec:
        def __init__(self, codec):
            self.codec, self.name, self.calls = codec, codec.name, 0

        def params(self):
            return self.codec.params()

        def encode(self, tensor):
            self.calls += 1
            return self.codec.encode(tensor)

    int8 = COMPRESSIONS["int8"]
    counting = CountingCodec(int8)
    once = EncodedOnce(counting)
    vector = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    chunks = [vector[0:2048], vector[2048:4096]]
    for _ in range(3):  # the same chunks to three members
        for chunk in chunks:
            buffers = once.encode(chunk)
            decoded = int8.decode(once.params(), torch.float32, chunk.numel(), buffers)
            assert torch.equal(
                decoded, int8.decode(int8.params(), torch.float32, chunk.numel(), int8.encode(chunk))
            )
    assert counting.calls == 2
    once.encode(vector[::2])  # not contiguous: encoded every time, never remembered
    once.encode(vector[::2])
    assert counting.calls == 4


def test_the_buffer_pool_hands_a_given_back_buffer_to_the_next_taker_of_its_size_only():
    from swarm.training.reduction import BufferPool

    pool = BufferPool(keep=2)
    first = pool.take(3, 100)
    assert first.shape == (3, 100) and first.dtype == torch.float32
    pool.give(first)
    again = pool.take(300)  # same size, another shape: the same memory
    assert again.data_ptr() == first.data_ptr() and again.shape == (300,)
    assert pool.take(300).data_ptr() != first.data_ptr()  # taken: nobody else gets it
    given = [torch.empty(size) for size in (10, 20, 30)]  # kept alive: their memory stays theirs
    for tensor in given:
        pool.give(tensor)
    assert pool.take(20).data_ptr() == given[1].data_ptr()
    assert pool.take(30).data_ptr() == given[2].data_ptr()
    assert pool.take(10).data_ptr() != given[0].data_ptr()  # the oldest was dropped (keep=2)


@pytest.mark.parametrize("compression", ["int8", "4bit", "none", "fp16"])
def test_a_kept_result_decodes_to_its_bits_from_memory_of_its_own(compression):
    """A released round keeps the part it backs up encoded (``kept_encoded``): decoding gives
    the result's bits (already a round trip: quantizing it again gives the same codes), and
    overwriting the result's buffer (it goes back to the pool) changes nothing kept."""
    from swarm.training.averaging_wire import COMPRESSIONS, codec_round_trip, kept_encoded

    codec = COMPRESSIONS[compression]
    values = torch.randn(64 * 1000 + 37, generator=torch.Generator().manual_seed(6)) * 3
    result = codec_round_trip(codec, values)
    expected = result.clone()
    kept = kept_encoded(codec, result)
    result.fill_(float("nan"))
    assert torch.equal(kept.decode(), expected)


@pytest.mark.parametrize("compression", ["int8", "none", "fp16"])
def test_a_round_trip_into_a_buffer_gives_the_bits_of_a_fresh_one(compression):
    """Reducers round-trip their aggregates in place and members their shares into pooled rows:
    the same bits as decoding the codec's bytes into a new tensor, which is what receivers do."""
    from swarm.training.averaging_wire import COMPRESSIONS, codec_round_trip

    codec = COMPRESSIONS[compression]
    values = torch.randn(64 * 1000 + 37, generator=torch.Generator().manual_seed(5)) * 3
    fresh = codec.decode(codec.params(), torch.float32, values.numel(), codec.encode(values))
    into = torch.full_like(values, float("nan"))
    assert codec_round_trip(codec, values, out=into).data_ptr() == into.data_ptr()
    assert torch.equal(into, fresh)
    in_place = values.clone()
    codec_round_trip(codec, in_place, out=in_place)
    assert torch.equal(in_place, fresh)


def test_a_part_state_reduces_into_pooled_buffers_it_gives_back_on_release():
    pool = BufferPool(keep=4)
    state = PartState(pool)
    contributions = [torch.randn(640, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for member, values in enumerate(contributions):
        state.add(member, 1.0, values)
    robust = RobustConfig(rule="centered_clip")
    first = state.compute(lambda values, out=None: out.copy_(values), robust)
    expected = aggregate_buffered({m: (1.0, v) for m, v in enumerate(contributions)}, robust).values
    assert torch.equal(first.values, expected)
    state.release()
    assert pool.take(640).data_ptr() == first.values.data_ptr()  # reused by the next round


def test_a_finished_round_holds_neither_the_callers_vector_nor_a_float32_copy_of_its_result():
    """A finished round stays reachable for repairs (``timeouts.repair``). Meanwhile it must
    not keep the caller's vector alive through its sent chunks, and the result it keeps for
    repairs is the codec's encoding (int8 here), the bits the members took, until the round
    is forgotten."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    async def scenario():
        vectors = [torch.randn(30_000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        memory = [StorageWeakRef(vector.untyped_storage()) for vector in vectors]
        timeouts = AllReduceTimeouts(scatter=5, gather=5, repair=0.2, call=5)
        async with _group(3, "int8", chunk_bytes=4096) as (services, members):
            outcomes = await asyncio.gather(
                *(services[i].all_reduce("r", members, i, v, 1.0, timeouts) for i, v in enumerate(vectors))
            )
            del vectors
            gc.collect()
            assert all(ref.expired() for ref in memory)  # though the rounds are still reachable
            assert all("r" in service._rounds for service in services)
            rounds = [service._rounds["r"] for service in services]
            for outcome in outcomes[1:]:
                assert torch.equal(outcome.averaged, outcomes[0].averaged)
            for member, round_ in enumerate(rounds):  # each backs up one part
                backed = next(part for part in range(3) if fallback_reducer(part, [1.0] * 3) == member)
                start, end = round_.parts[backed]
                assert isinstance(round_._kept, EncodedTensor)
                assert torch.equal(round_._kept.decode(), outcomes[0].averaged[start:end])
            deadline = asyncio.get_running_loop().time() + 5
            while any("r" in service._rounds for service in services):
                assert asyncio.get_running_loop().time() < deadline, "finished rounds never forgotten"
                await asyncio.sleep(0.05)
            assert all(round_._kept is None for round_ in rounds)

    asyncio.run(scenario())

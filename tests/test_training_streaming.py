"""Streaming DiLoCo: fragment layout and schedule, P = 1 / tau = 0 equal to plain DiLoCo bit for bit,
the merge rules, and real `swarm train` members that stream through a kill, a joiner and a restart."""

from __future__ import annotations

import itertools
import tempfile
from collections import defaultdict

import pytest
import torch

from kernels.tiny import write_tiny_checkpoint
from swarm.training.diloco import DiLoCoConfig, average_weighted, flatten_parameters
from swarm.training.fragments import fragment_of_round, fragment_rounds, make_fragments, model_fragments
from swarm.training.progress import TrainerState, TrainingPeerRecord
from swarm.training.replica import Replica
from swarm.training.run_checkpoint import (
    checkpoint_state,
    load_training_state,
    restore_checkpoint,
    save_training_state,
)
from swarm.training.streaming import StreamingConfig, StreamingReplica
from swarm.training.trainer_config import TrainerConfig
from swarm.training.training_model import init_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_config():
    with tempfile.TemporaryDirectory() as directory:
        return write_tiny_checkpoint(directory, num_layers=4, hidden_size=32, vocab_size=128)


_DATA = (torch.randint(0, 128, (20_000,), generator=torch.Generator().manual_seed(7)).numpy(), 16)
"""Every member's tokens and window length."""


def _replicas(model_config, count: int, config: DiLoCoConfig) -> list[Replica]:
    replicas = []
    for member in range(count):
        replica = Replica(init_model(model_config, seed=0), config)
        replica.attach_data(*_DATA, seed=member)
        replicas.append(replica)
    return replicas


def test_fragments_are_strided_over_depth_equal_and_cover_every_parameter_once(model_config):
    model = init_model(model_config, seed=0)
    total = sum(p.numel() for p in model.parameters())
    for count in (1, 2, 4):
        fragments = model_fragments(model, count)
        covered = torch.zeros(total, dtype=torch.int64)
        for fragment in fragments:
            for start, end in fragment.ranges:
                covered[start:end] += 1
        assert bool((covered == 1).all())
        sizes = [fragment.numel for fragment in fragments]
        assert max(sizes) - min(sizes) <= 1, sizes  # 4 blocks over P in {1, 2, 4}: equal to one value
    # the paper's strided pattern: with P=2, blocks 0 and 2 sync together, 1 and 3 together
    sizes = [
        ("embed", 10),
        ("blocks.0.w", 4),
        ("blocks.1.w", 4),
        ("blocks.2.w", 4),
        ("blocks.3.w", 4),
        ("head", 6),
    ]
    first, second = make_fragments(sizes, 2)
    assert first.ranges == ((0, 8), (10, 14), (18, 22))  # embeddings' first 8, blocks 0 and 2
    assert second.ranges == ((8, 10), (14, 18), (22, 32))  # the rest of the embeddings, blocks 1 and 3, head
    with pytest.raises(ValueError, match="--streaming-fragments"):
        make_fragments(sizes, 5)


def test_each_fragment_syncs_every_h_steps_offset_by_h_over_p():
    inner_steps, count = 12, 3
    every = inner_steps // count
    syncs = defaultdict(list)
    for round_index in range(30):
        step = (round_index + 1) * every  # outer step r is taken at inner step (r + 1) H / P
        syncs[fragment_of_round(round_index, count)].append(step)
    for fragment, steps in syncs.items():
        assert all((step - fragment * every) % inner_steps == 0 for step in steps)
        assert all(b - a == inner_steps for a, b in itertools.pairwise(steps))
    assert fragment_rounds(30, count) == [10, 10, 10]
    assert fragment_rounds(4, count) == [1, 2, 1]


def test_one_fragment_without_overlap_is_plain_diloco_bit_for_bit(model_config):
    config = DiLoCoConfig(inner_lr=3e-3, warmup_steps=2)
    plain = _replicas(model_config, 2, config)
    streamed = _replicas(model_config, 2, config)
    streaming = [
        StreamingReplica(r, StreamingConfig(fragments=1, overlap_steps=0, inner_steps=4)) for r in streamed
    ]
    for _ in range(3):
        for replica in plain + streamed:
            for _ in range(4):
                replica.train_step(2)
        for stream in streaming:
            stream.add_samples(8)
        average = average_weighted([(8.0, r.pseudo_gradient()) for r in plain])
        for replica in plain:
            replica.apply_outer_step(average)
        begun = [s.begin(s.next_fragment(), due_step=0) for s in streaming]
        streamed_average = average_weighted([(weight, vector) for _, vector, weight in begun])
        for stream, (pending, _, _) in zip(streaming, begun, strict=True):
            stream.finish(pending, streamed_average, members=2)
    for a, b in zip(plain, streamed, strict=True):
        assert a.round == b.round == 3
        assert a.parameters_hash() == b.parameters_hash()
        assert torch.equal(a.outer.momentum, b.outer.momentum)
        assert torch.equal(flatten_parameters(a.model), flatten_parameters(b.model))


@pytest.mark.parametrize("eager", [False, True])
def test_overlapped_syncs_keep_members_bit_identical_and_merge_as_documented(model_config, eager):
    config = DiLoCoConfig(inner_lr=3e-3, warmup_steps=2)
    replicas = _replicas(model_config, 3, config)
    settings = StreamingConfig(fragments=2, overlap_steps=1, mix_alpha=0.25, eager=eager, inner_steps=4)
    streaming = [StreamingReplica(r, settings) for r in replicas]
    for round_index in range(6):
        for stream in streaming:
            for _ in range(settings.sync_every):
                stream.replica.train_step(2)
                stream.add_samples(2)
        begun = [s.begin(s.next_fragment(), due_step=0) for s in streaming]
        assert all(weight == 2 * settings.sync_every * (2 if round_index else 1) for _, _, weight in begun)
        average = average_weighted([(weight, vector) for _, vector, weight in begun])
        for stream in streaming:
            stream.replica.train_step(2)  # the overlap: the exchange is in flight for one step
        for stream, (pending, _, _) in zip(streaming, begun, strict=True):
            views = stream._views[pending.fragment.index]
            local_before = torch.cat([v.reshape(-1) for v in views]).clone()
            stream.finish(pending, average, members=3)
            new_global = pending.fragment.gather(stream.replica.outer.parameters.detach())
            local_after = torch.cat([v.reshape(-1) for v in views])
            if pending.eager_local is not None:
                expected = local_before + (new_global - pending.eager_local)
            else:
                expected = 0.25 * local_before + 0.75 * new_global
            torch.testing.assert_close(local_after, expected, rtol=0, atol=1e-6)
        hashes = {stream.replica.parameters_hash() for stream in streaming}
        assert len(hashes) == 1, f"members differ after outer step {round_index}"
    assert replicas[0].round == 6
    if eager:  # from each fragment's second sync on, the local fragment took the eager step
        assert streaming[0]._last and all(len(entry) == 3 for entry in streaming[0]._last.values())


def _streaming_round(streaming: list[StreamingReplica], settings: StreamingConfig) -> None:
    """One fragment sync of every member: H/P inner steps, the exchange over ``tau`` more, the merge."""
    for stream in streaming:
        for _ in range(settings.sync_every):
            stream.replica.train_step(2)
            stream.add_samples(2)
    begun = [s.begin(s.next_fragment(), due_step=0) for s in streaming]
    average = average_weighted([(weight, vector) for _, vector, weight in begun])
    for stream in streaming:
        for _ in range(settings.overlap_steps):
            stream.replica.train_step(2)
            stream.add_samples(2)
    for stream, (pending, _, _) in zip(streaming, begun, strict=True):
        stream.finish(pending, average, members=len(streaming))


def test_a_resumed_member_takes_its_eager_history_and_sample_counts_back(model_config, tmp_path):
    config = DiLoCoConfig(inner_lr=3e-3, warmup_steps=2)
    settings = StreamingConfig(fragments=2, overlap_steps=1, eager=True, inner_steps=4)
    streaming = [StreamingReplica(r, settings) for r in _replicas(model_config, 3, config)]
    for _ in range(3):  # fragment 0 synced twice, fragment 1 once: both have an eager history
        _streaming_round(streaming, settings)
    for member, stream in enumerate(streaming):
        save_training_state(tmp_path / str(member), checkpoint_state(stream.replica, [], stream.state_dict()))

    def resumed(keep_streaming_state: bool) -> list[StreamingReplica]:
        members = []
        for member, replica in enumerate(_replicas(model_config, 3, config)):
            checkpoint = load_training_state(tmp_path / str(member))
            restore_checkpoint(replica, checkpoint)
            stream = StreamingReplica(replica, settings)
            if keep_streaming_state:
                assert stream.load_state_dict(checkpoint["streaming"])
            members.append(stream)
        return members

    restarted, restarted_blank = resumed(True), resumed(False)
    assert restarted[0].samples_since_sync == streaming[0].samples_since_sync != [0.0, 0.0]
    for _ in range(3):
        for group in (streaming, restarted, restarted_blank):
            _streaming_round(group, settings)
    for kept, member in zip(restarted, streaming, strict=True):
        assert torch.equal(flatten_parameters(kept.replica.model), flatten_parameters(member.replica.model))
        assert kept.replica.parameters_hash() == member.replica.parameters_hash()
    # without it, the first syncs after the restart skip the eager step and weigh less work
    assert restarted_blank[0].replica.parameters_hash() != streaming[0].replica.parameters_hash()
    # a state downloaded since the checkpoint makes it someone else's history: not taken
    other = StreamingReplica(_replicas(model_config, 1, config)[0], settings)
    assert not other.load_state_dict(streaming[0].state_dict())
    assert not restarted[0].load_state_dict({**streaming[0].state_dict(), "fragments": 4})


def test_flags_are_validated_and_name_themselves(tmp_path):
    with pytest.raises(ValueError, match=r"--inner-steps .* multiple of --streaming-fragments"):
        TrainerConfig(model=str(tmp_path), inner_steps=10, streaming_fragments=3)
    with pytest.raises(ValueError, match="--overlap-steps"):
        TrainerConfig(model=str(tmp_path), inner_steps=8, streaming_fragments=2, overlap_steps=5)
    with pytest.raises(ValueError, match="--mix-alpha"):
        TrainerConfig(model=str(tmp_path), mix_alpha=1.5)
    with pytest.raises(ValueError, match="--round-seconds 0"):
        TrainerConfig(model=str(tmp_path), streaming_fragments=2, round_seconds=5.0)
    plain = TrainerConfig(model=str(tmp_path))
    assert not plain.streaming.enabled
    assert TrainerConfig(model=str(tmp_path), overlap_steps=1).streaming.enabled


def test_the_record_carries_fragment_wait_and_inner_share():
    record = TrainingPeerRecord(
        TrainerState.TRAINING, 7, 70, 2.5, ((6, 2.6),), 100.0, 1000, 3, "ab", ("tcp://x:1",), b"k" * 40,
        1e6, "0", 1.0, fragments=4, fragment=3, wait_seconds=0.25, inner_share=0.98,
    )  # fmt: skip
    again = TrainingPeerRecord.from_wire(record.to_wire())
    assert (again.fragments, again.fragment, again.wait_seconds, again.inner_share) == (4, 3, 0.25, 0.98)
    wire = record.to_wire()
    for key in ("frags", "frag", "wait", "busy"):  # a record of an older member has none of them
        del wire[key]
    older = TrainingPeerRecord.from_wire(wire)
    assert (older.fragments, older.fragment) == (1, 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streaming_members_survive_a_kill_mid_exchange_admit_a_joiner_and_resume(tmp_path):
    """Real `swarm train` processes, P=2 fragments and tau=2 overlap: c is SIGKILLed as it sends its
    reduced part; a and b finish that sync and go on; d joins and downloads every fragment; a
    restarts from its checkpoint; per outer step, every member logs the same hash of theta_global."""
    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity
    from tests.test_training_swarm import rounds_of, wait_for_round

    write_tiny_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64)
    bootstrap = SwarmDHT(
        Identity.generate(), DHTConfig(swarm_name="ci", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    )
    bootstrap.start()
    group = ProcessGroup(tmp_path)
    common = [
        "train", "--model", str(tmp_path / "model"), "--init", "random", "--run", "stream", "--swarm", "ci",
        "--initial-peers", bootstrap.visible_maddrs()[0], "--inner-steps", "12", "--seq-len", "32",
        "--batch-size", "4", "--corpus-bytes", "300000", "--warmup-steps", "5", "--inner-lr", "2e-3",
        "--matchmaking-seconds", "6", "--phase-timeout", "4", "--record-ttl", "6",
        "--streaming-fragments", "2", "--overlap-steps", "2", "--eager",
    ]  # fmt: skip

    def trainer(name, *extra, env=None):
        return group.start(name, [*common, "--identity", str(tmp_path / f"{name}.pem"), *extra], env)

    try:
        a = trainer("a", "--checkpoint-dir", str(tmp_path / "ckpt-a"))
        b = trainer("b")
        c = trainer("c", env={"SWARM_FAULT": "2:result:3"})  # dies in its second sync among three
        for process in (a, b, c):
            process.wait_for_line("joined run", timeout=120)
        full = wait_for_round(a, "a sync with 3 members", lambda r: r.members == 3)
        assert c.process.wait(timeout=120) == -9
        for survivor in (a, b):
            wait_for_round(
                survivor, "a sync of a and b after c died", lambda r: r.members == 2 and r.index > full.index
            )

        d = trainer("d")
        d.wait_for_line("synced state of round", timeout=120)
        wait_for_round(d, "a sync with a, b and d", lambda r: r.members == 3)

        checkpointed = rounds_of(a)[-1].index
        a.kill()
        for survivor in (b, d):
            wait_for_round(survivor, "two syncs past a's checkpoint", lambda r: r.index >= checkpointed + 2)
        a_again = trainer("a-again", "--checkpoint-dir", str(tmp_path / "ckpt-a"))
        a_again.wait_for_line("resumed from checkpoint", timeout=120)
        wait_for_round(a_again, "a sync with the restarted a, b and d", lambda r: r.members == 3)
        for process in (a_again, b, d):
            assert process.terminate(timeout=120) == 0

        hashes: dict[int, set[str]] = defaultdict(set)
        fragments_synced = set()
        for process in (a, b, c, d, a_again):
            for line in process.lines:
                if " done: " in line and "fragment " in line:
                    fragments_synced.add(int(line.split("fragment ")[1].split()[0]))
            for done in rounds_of(process):
                if done.members >= 2:
                    hashes[done.index].add(done.hash)
        assert fragments_synced == {0, 1}
        assert not {i: h for i, h in hashes.items() if len(h) > 1}, "members disagree after a sync"
        history = rounds_of(b)
        assert history[-1].loss < history[0].loss, f"loss did not decrease: {history}"
    finally:
        group.close()
        bootstrap.shutdown()

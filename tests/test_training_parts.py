import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarm.training.parts import arbiter_of, fallback_reducer, split_parts


@given(
    numel=st.integers(0, 10**7),
    bandwidths=st.lists(st.floats(0.1, 1000), min_size=1, max_size=16),
    alignment=st.sampled_from([1, 2, 64, 4096]),
)
def test_parts_cover_the_vector_contiguously_on_aligned_boundaries(numel, bandwidths, alignment):
    parts = split_parts(numel, bandwidths, alignment)
    assert len(parts) == len(bandwidths)
    assert parts[0][0] == 0 and parts[-1][1] == numel
    for (_, end), (start, _) in itertools.pairwise(parts):
        assert end == start and (start % alignment == 0 or start == numel)
    assert all(start <= end for start, end in parts)


def test_parts_follow_bandwidth():
    parts = split_parts(64 * 1000, [1.0, 3.0], alignment=64)
    assert parts == [(0, 64 * 250), (64 * 250, 64 * 1000)]


def test_bad_bandwidth_is_rejected():
    # 0 is allowed (a relayed member holds no reducer share, issue #13); negatives and NaN are not
    for bad in ([1.0, -1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            split_parts(10, bad)
    with pytest.raises(ValueError):
        split_parts(10, [])


def test_backup_and_arbiter_are_the_next_members_in_the_ring_that_reduce():
    assert [fallback_reducer(i, [1.0] * 3) for i in range(3)] == [1, 2, 0]
    assert [arbiter_of(i, [1.0] * 3) for i in range(3)] == [2, 0, 1]
    # member 3 is reached through relays (bandwidth 0): it backs up and arbitrates nothing
    relayed = [1.0, 2.0, 1.0, 0.0]
    assert [fallback_reducer(i, relayed) for i in range(4)] == [1, 2, 0, 0]
    assert [arbiter_of(i, relayed) for i in range(4)] == [2, 0, 1, 1]
    # with only two members that reduce, the relayed one is the arbiter they need
    assert [(fallback_reducer(i, [1.0, 1.0, 0.0]), arbiter_of(i, [1.0, 1.0, 0.0])) for i in range(3)] == [
        (1, 2),
        (0, 2),
        (0, 1),
    ]
    assert [fallback_reducer(i, [0.0] * 3) for i in range(3)] == [1, 2, 0]  # all relayed: the ring
    assert (fallback_reducer(0, [1.0, 1.0]), arbiter_of(0, [1.0, 1.0])) == (1, 0)  # two: no arbiter

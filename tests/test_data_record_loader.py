"""--loader record: PR #1394's data order against a plain re-statement of its rules."""

from __future__ import annotations

import numpy as np
import pytest

from qlab.data.record_loader import RecordSequenceLoader
from qlab.data.shards import write_shard
from qlab.errors import DataError

L = 8


@pytest.fixture()
def shards(tmp_path):
    sizes = [8 * 10 + 1, 8 * 7 + 5, 8 * 12 + 3, 8 * 3 + 1, 8 * 9 + 2]
    files, offset = [], 0
    for i, n in enumerate(sizes):
        files.append(write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(offset, offset + n)))
        offset += n
    return files, sizes


def _reference_starts(sizes, seq_len, rank, world, count):
    """The record's rules, one by one: own shards, PCG64(rank), cut with a phase, draw by
    remaining windows, pop from the end, re-cut all when every shard is used up."""
    mine = list(range(len(sizes)))[rank::world]
    rng = np.random.Generator(np.random.PCG64(rank))
    lists = {}

    def cut(si):
        n = sizes[si]
        max_phase = min(seq_len - 1, max(0, n - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        order = rng.permutation((n - 1 - phase) // seq_len)
        lists[si] = [phase + int(o) * seq_len for o in order]

    for si in mine:
        cut(si)
    out = []
    for _ in range(count):
        left = np.array([float(len(lists[si])) for si in mine])
        if left.sum() <= 0:
            for si in mine:
                cut(si)
            left = np.array([float(len(lists[si])) for si in mine])
        pick = mine[int(rng.choice(len(mine), p=left / left.sum()))]
        out.append((pick, lists[pick].pop()))
    return out


@pytest.mark.parametrize("rank, world", [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_sequences_follow_the_records_rules(shards, rank, world):
    files, sizes = shards
    loader = RecordSequenceLoader(files, L, rank, world)
    total = sum((n - 1) // L for n in sizes[rank::world])
    count = 3 * total + 5  # several full passes: exercises the re-cut
    want = _reference_starts(sizes, L, rank, world, count)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x, y = loader.next_batch(count)
    starts = [(int(offsets[si]) + st) for si, st in want]
    assert x[:, 0].tolist() == starts  # token value = global position
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()


def test_seed_does_not_enter_and_resume_replays(shards):
    files, _ = shards
    a = RecordSequenceLoader(files, L)
    first = a.next_batch(13)[0]
    state = a.state_dict()
    rest = a.next_batch(40)[0]
    b = RecordSequenceLoader(files, L)
    b.load_state_dict(state)
    assert (b.next_batch(40)[0] == rest).all()
    assert (RecordSequenceLoader(files, L).next_batch(13)[0] == first).all()


def test_bad_states_and_inputs_are_named(shards, tmp_path):
    files, _ = shards
    loader = RecordSequenceLoader(files, L)
    with pytest.raises(DataError, match="record-loader"):
        loader.load_state_dict({"position": 3, "seed": 1})
    with pytest.raises(DataError, match="seq_len"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 4})
    with pytest.raises(DataError, match="drawn"):
        loader.load_state_dict({**loader.state_dict(), "drawn": -1})
    with pytest.raises(DataError, match="no shard for rank"):
        RecordSequenceLoader(files[:1], L, rank=1, world_size=2)
    short = write_shard(tmp_path / "short.bin", [1, 2, 3])
    with pytest.raises(DataError, match="shorter"):
        RecordSequenceLoader([short], L)

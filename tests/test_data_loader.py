from __future__ import annotations

import numpy as np
import pytest
import torch

from qlab.data.loader import ShuffledSequenceLoader, load_validation_tokens
from qlab.data.shards import write_shard
from qlab.errors import DataError

L = 8


@pytest.fixture()
def shard_files(tmp_path):
    # token value = global position mod 60000, so every window is identifiable
    sizes = [8 * 10 + 1, 8 * 7 + 5, 8 * 12 + 1]
    files, offset = [], 0
    for i, n in enumerate(sizes):
        files.append(write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(offset, offset + n) % 60000))
        offset += n
    return files


def _rows(x):
    return [tuple(r) for r in x.tolist()]


def test_shapes_and_shift(shard_files):
    loader = ShuffledSequenceLoader(shard_files, L, seed=3)
    x, y = loader.next_batch(5)
    assert x.shape == y.shape == (5, L) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens within a shard


def test_epoch_covers_every_window_once(shard_files):
    loader = ShuffledSequenceLoader(shard_files, L, seed=1)
    assert loader.num_sequences == 10 + 7 + 12
    x, _ = loader.next_batch(loader.num_sequences)
    starts = sorted(int(v) for v in x[:, 0])
    expected = sorted(
        [8 * k for k in range(10)] + [81 + 8 * k for k in range(7)] + [142 + 8 * k for k in range(12)]
    )
    assert starts == expected
    x2, _ = loader.next_batch(loader.num_sequences)  # second epoch: same set, new order
    assert sorted(int(v) for v in x2[:, 0]) == expected and not torch.equal(x, x2)


def test_deterministic_and_seed_dependent(shard_files):
    a = [ShuffledSequenceLoader(shard_files, L, seed=0).next_batch(7)[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    other = ShuffledSequenceLoader(shard_files, L, seed=1).next_batch(7)[0]
    assert not torch.equal(a[0], other)


@pytest.mark.parametrize("world", [2, 3])
def test_world_size_contract_and_disjoint_ranks(shard_files, world):
    b, steps = 3, 6  # crosses epoch boundaries (29 sequences per epoch)
    single = ShuffledSequenceLoader(shard_files, L, seed=5)
    ranks = [ShuffledSequenceLoader(shard_files, L, rank=r, world_size=world, seed=5) for r in range(world)]
    for _ in range(steps):
        ref_x, ref_y = single.next_batch(world * b)
        parts = [loader.next_batch(b) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), ref_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), ref_y)
        seen = [set(_rows(p[0])) for p in parts]
        for i in range(world):
            for j in range(i + 1, world):
                assert not seen[i] & seen[j]


def test_state_dict_resume(shard_files):
    full = ShuffledSequenceLoader(shard_files, L, rank=1, world_size=2, seed=9)
    batches = [full.next_batch(4)[0] for _ in range(8)]
    first = ShuffledSequenceLoader(shard_files, L, rank=1, world_size=2, seed=9)
    for _ in range(3):
        first.next_batch(4)
    state = first.state_dict()
    resumed = ShuffledSequenceLoader(shard_files, L, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(state)
    for expected in batches[3:]:
        assert torch.equal(resumed.next_batch(4)[0], expected)


def test_state_dict_mismatch(shard_files):
    state = ShuffledSequenceLoader(shard_files, L, seed=0).state_dict()
    with pytest.raises(DataError, match="seed"):
        ShuffledSequenceLoader(shard_files, L, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="num_sequences"):
        ShuffledSequenceLoader(shard_files[:2], L, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="position"):
        ShuffledSequenceLoader(shard_files, L, seed=0).load_state_dict({**state, "position": -1})


def test_loader_argument_errors(shard_files, tmp_path):
    with pytest.raises(DataError, match="no shard files"):
        ShuffledSequenceLoader([], L)
    with pytest.raises(DataError, match="rank"):
        ShuffledSequenceLoader(shard_files, L, rank=2, world_size=2)
    short = write_shard(tmp_path / "short.bin", [1, 2, 3])
    with pytest.raises(DataError, match="no full sequence"):
        ShuffledSequenceLoader([short], L)
    with pytest.raises(DataError, match="out of range"):
        ShuffledSequenceLoader(shard_files, L, vocab_size=100)


def test_validation_truncation(tmp_path):
    a = write_shard(tmp_path / "val_000000.bin", np.arange(20))
    b = write_shard(tmp_path / "val_000001.bin", np.arange(20, 33))
    tokens = load_validation_tokens([a, b], seq_len=8)  # N = 33 -> 4*8 + 1 = 33
    assert tokens.dtype == torch.int64 and tokens.tolist() == list(range(33))
    tokens = load_validation_tokens([a, b], seq_len=5)  # floor(32/5)*5 + 1 = 31
    assert tokens.tolist() == list(range(31))
    tokens = load_validation_tokens([a], seq_len=7)  # floor(19/7)*7 + 1 = 15
    assert len(tokens) == 15
    with pytest.raises(DataError, match="fewer than seq_len"):
        load_validation_tokens([a], seq_len=20)


def test_validation_on_tiny_dataset(tiny_dataset):
    tokens = load_validation_tokens(tiny_dataset.val_files, 64, vocab_size=tiny_dataset.vocab_size)
    assert (len(tokens) - 1) % 64 == 0 and tokens[0] == 1
    assert tiny_dataset.val_tokens - len(tokens) < 64

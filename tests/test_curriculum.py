"""Entropy-bucket curriculum: scores, buckets, the crossfade schedule and the sampler."""

from __future__ import annotations

import numpy as np
import pytest

from qlab.data import ShuffledSequenceLoader
from qlab.errors import ConfigError, DataError
from qlab.train.curriculum import (
    CurriculumSampler,
    bucket_probabilities,
    build_manifest,
    crossfade_weights,
    schedule_table,
    unigram_entropy,
)

SEQ = 8


def _slow_entropy(row: np.ndarray) -> float:
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _graded_tokens(n_windows: int = 40, seed: int = 0) -> np.ndarray:
    """Windows of SEQ + 1 tokens with increasing numbers of distinct tokens (difficulty)."""
    rng = np.random.default_rng(seed)
    tokens = [0]
    for i in range(n_windows):
        alphabet = 1 + i % 8  # window i draws from {0..alphabet-1}
        tokens += list(rng.integers(0, alphabet, SEQ))
    return np.array(tokens, dtype=np.int64)


def test_unigram_entropy_by_hand_and_against_slow():
    rows = np.array([[0, 0, 1, 1], [5, 5, 5, 5], [0, 1, 2, 3], [7, 7, 7, 9]])
    np.testing.assert_allclose(unigram_entropy(rows), [1.0, 0.0, 2.0, _slow_entropy(rows[3])])
    rand = np.random.default_rng(1).integers(0, 6, (50, 17))
    np.testing.assert_allclose(unigram_entropy(rand), [_slow_entropy(r) for r in rand])


def test_manifest_buckets_by_score_rank():
    tokens = _graded_tokens()
    m = build_manifest(tokens, SEQ, n_buckets=4)
    assert m.num_sequences == 40 and m.score_name == "unigram_entropy"
    np.testing.assert_array_equal(np.bincount(m.buckets), [10, 10, 10, 10])
    for i in range(m.num_sequences):
        np.testing.assert_array_equal(m.window(i), tokens[i * SEQ : i * SEQ + SEQ + 1])
        assert m.scores[i] == pytest.approx(_slow_entropy(m.window(i)))
    # every score in bucket b is ≤ every score in bucket b + 1
    for b in range(3):
        assert m.scores[m.buckets == b].max() <= m.scores[m.buckets == b + 1].min()
    frame = m.to_frame()
    assert list(frame.columns) == ["index", "shard", "start", "score", "bucket"] and len(frame) == 40
    custom = build_manifest([tokens, tokens[:50]], SEQ, 2, score=lambda w: -w.sum(axis=1).astype(float))
    assert custom.num_sequences == 40 + 6 and set(custom.shard_index) == {0, 1}


def test_manifest_from_loader(tiny_dataset):
    loader = ShuffledSequenceLoader(tiny_dataset.train_files, 64)
    m = build_manifest(loader, 64, n_buckets=5)
    assert m.num_sequences == loader.num_sequences
    assert np.bincount(m.buckets).min() >= m.num_sequences // 5


def test_manifest_errors():
    with pytest.raises(DataError, match="fewer than 8 buckets"):
        build_manifest(np.arange(20), SEQ, n_buckets=8)
    with pytest.raises(ConfigError, match="unknown score"):
        build_manifest(np.arange(100), SEQ, score="perplexity")
    with pytest.raises(DataError, match="1-D integers"):
        build_manifest(np.ones((3, 30)), SEQ)
    with pytest.raises(DataError, match="finite"):
        build_manifest(np.arange(100), SEQ, 2, score=lambda w: np.full(len(w), np.nan))


def test_schedule_endpoints_by_hand():
    # B = 3, floor 0.1: w(0) = [1, ½, 0] → p = 0.1 + 0.7·[⅔, ⅓, 0]
    np.testing.assert_allclose(bucket_probabilities(0.0, 3, 0.1), [0.1 + 0.7 * 2 / 3, 0.1 + 0.7 / 3, 0.1])
    np.testing.assert_allclose(bucket_probabilities(1.0, 3, 0.1), [0.1, 0.1 + 0.7 / 3, 0.1 + 0.7 * 2 / 3])
    np.testing.assert_allclose(bucket_probabilities(0.5, 3, 0.1), [1 / 3] * 3)
    np.testing.assert_allclose(crossfade_weights(0.25, 5), [0.75, 0.625, 0.5, 0.375, 0.25])
    np.testing.assert_allclose(bucket_probabilities(0.3, 1, 0.5), [1.0])
    np.testing.assert_allclose(bucket_probabilities(1.7, 4, 0.0), bucket_probabilities(1.0, 4, 0.0))


def test_schedule_sums_floor_and_monotone_shift():
    fracs = np.linspace(0, 1, 21)
    probs = np.array([bucket_probabilities(t, 8, 0.05) for t in fracs])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs.min() >= 0.05 - 1e-12
    mean_bucket = probs @ np.arange(8)
    assert np.all(np.diff(mean_bucket) > 0)
    assert np.all(np.diff(probs[:, 4:].sum(axis=1)) > 0)  # mass of the hard half grows
    assert np.all(np.diff(probs[:, -1]) > 0) and np.all(np.diff(probs[:, 0]) < 0)
    table = schedule_table(fracs, 8, 0.05)
    assert len(table) == 21 * 8 and list(table.columns) == ["frac", "bucket", "weight", "prob"]
    np.testing.assert_allclose(table.groupby("frac")["weight"].sum(), 4.0)  # Σw = B/2
    with pytest.raises(ConfigError, match="floor"):
        bucket_probabilities(0.5, 8, 0.2)
    with pytest.raises(ConfigError, match="fraction"):
        bucket_probabilities(float("nan"), 8)


def _sampler(floor: float = 0.0, **kw) -> CurriculumSampler:
    return CurriculumSampler(build_manifest(_graded_tokens(), SEQ, n_buckets=4), floor=floor, **kw)


def _window_ids(sampler: CurriculumSampler, x: np.ndarray, y: np.ndarray) -> list[int]:
    windows = [np.concatenate([xr, yr[-1:]]) for xr, yr in zip(x, y)]
    m = sampler.manifest
    return [next(i for i in range(m.num_sequences) if np.array_equal(m.window(i), w)) for w in windows]


def test_batches_come_from_the_scheduled_buckets():
    s = _sampler(floor=0.0)
    x, y = s.next_batch(6, 0.0)  # floor 0, t = 0: p = [½, ⅓, ⅙, 0] → never the hardest bucket
    assert x.shape == (6, SEQ) and y.shape == (6, SEQ)
    np.testing.assert_array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    ids = _window_ids(s, x.numpy(), y.numpy())
    assert all(s.manifest.buckets[i] != 3 for i in ids)
    s2 = CurriculumSampler(build_manifest(_graded_tokens(), SEQ, n_buckets=2), floor=0.0)
    idx = s2.sample_indices(10, 0.0)  # B = 2 at t = 0: only bucket 0
    assert set(s2.manifest.buckets[idx]) == {0}
    idx = s2.sample_indices(10, 1.0)
    assert set(s2.manifest.buckets[idx]) == {1}


def test_empirical_bucket_frequencies_follow_weights():
    s = _sampler(floor=0.1, seed=3)
    idx = np.concatenate([s.sample_indices(50, 0.8) for _ in range(40)])  # 2000 draws
    freq = np.bincount(s.manifest.buckets[idx], minlength=4) / len(idx)
    np.testing.assert_allclose(freq, s.weights(0.8), atol=0.04)


def test_each_bucket_visited_once_before_repeats():
    s = _sampler(floor=0.0)
    idx = s.sample_indices(10, 1.0)  # p = [0, ⅙, ⅓, ½]
    for b in range(4):
        drawn = idx[s.manifest.buckets[idx] == b]
        assert len(set(drawn.tolist())) == min(len(drawn), 10)


def test_deterministic_resumable_and_rank_split():
    a, b = _sampler(floor=0.05, seed=7), _sampler(floor=0.05, seed=7)
    for t in (0.0, 0.3):
        np.testing.assert_array_equal(a.sample_indices(5, t), b.sample_indices(5, t))
    state = a.state_dict()
    expected = [a.sample_indices(5, t) for t in (0.5, 0.9, 1.0)]
    c = _sampler(floor=0.05, seed=7)
    c.load_state_dict(state)
    for t, want in zip((0.5, 0.9, 1.0), expected):
        np.testing.assert_array_equal(c.sample_indices(5, t), want)
    whole = _sampler(floor=0.05, seed=7).sample_indices(6, 0.4)
    r0 = _sampler(floor=0.05, seed=7, rank=0, world_size=2).sample_indices(3, 0.4)
    r1 = _sampler(floor=0.05, seed=7, rank=1, world_size=2).sample_indices(3, 0.4)
    np.testing.assert_array_equal(np.concatenate([r0, r1]), whole)
    assert not np.array_equal(
        _sampler(seed=8).sample_indices(6, 0.4), _sampler(seed=7).sample_indices(6, 0.4)
    )
    with pytest.raises(DataError, match="seed"):
        _sampler(floor=0.05, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="rank"):
        _sampler(rank=2, world_size=2)

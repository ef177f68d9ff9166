"""PR #1818's entropy-bucket curriculum: sample easy sequences first, hard ones later.

1. **Manifest** (:func:`build_manifest`): the training tokens are cut into windows of
   seq_len + 1 tokens at multiples of seq_len (as :class:`qlab.data.ShuffledSequenceLoader`
   cuts them), each window gets a difficulty score — by default its unigram entropy in
   bits, −Σ p log₂ p over the window's own token frequencies — and the windows are split
   by score rank into ``n_buckets`` equal-count buckets, 0 = easiest (lowest score).
2. **Crossfade** (:func:`crossfade_weights`): at training fraction t ∈ [0, 1] (wallclock
   or steps) bucket b of B has the pre-normalisation weight
   w_b(t) = (1 − t)·(1 − b/(B−1)) + t·b/(B−1), a linear crossfade from "easy only" to
   "hard only" (PR #1818's figure). Σ_b w_b = B/2 at every t.
3. **Floor** (:func:`bucket_probabilities`): sampling probabilities
   p_b = floor + (1 − B·floor)·w_b/Σw, so every bucket keeps at least ``floor``
   probability and they sum to 1. (PR #1818 clamps the pre-normalisation weight at its
   floor, 0.02 in its figure; applying the floor to the probability makes the
   guarantee exact.)

:class:`CurriculumSampler` draws each batch row's bucket from p(t), then the next
sequence of that bucket's seeded permutation (every sequence of a bucket is visited once
before any repeats). Batch i uses a generator seeded by (seed, i), so a run resumed from
``state_dict()`` draws the same batches. Like the loader, the sampler draws a global batch
of world_size·B rows and rank r takes rows [r·B, (r+1)·B).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from qlab.errors import ConfigError, DataError

ScoreFn = Callable[[np.ndarray], np.ndarray]  # (n, seq_len + 1) windows -> (n,) scores


def unigram_entropy(windows: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row's own token distribution, vectorised over rows."""
    n, length = windows.shape
    if n == 0:
        return np.zeros(0)
    s = np.sort(windows, axis=1)
    starts = np.ones_like(s, dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    flat = np.flatnonzero(starts.ravel())  # each run of equal tokens starts here
    counts = np.diff(np.append(flat, n * length))
    p = counts / length
    return np.bincount(flat // length, weights=-p * np.log2(p), minlength=n)


SCORES: dict[str, ScoreFn] = {"unigram_entropy": unigram_entropy}


@dataclass
class Manifest:
    """Training windows with their score and bucket (one entry per window)."""

    shards: list[np.ndarray]
    seq_len: int
    n_buckets: int
    score_name: str
    shard_index: np.ndarray  # (n,) which shard each window comes from
    starts: np.ndarray  # (n,) first token of the window within its shard
    scores: np.ndarray  # (n,) difficulty score
    buckets: np.ndarray  # (n,) bucket id, 0 = easiest

    @property
    def num_sequences(self) -> int:
        return int(self.starts.size)

    def members(self, bucket: int) -> np.ndarray:
        """Manifest indices of the windows in ``bucket`` (ascending)."""
        return np.flatnonzero(self.buckets == bucket)

    def window(self, i: int) -> np.ndarray:
        """The seq_len + 1 tokens of manifest entry ``i``."""
        start = int(self.starts[i])
        return self.shards[int(self.shard_index[i])][start : start + self.seq_len + 1]

    def to_frame(self) -> pd.DataFrame:
        """One row per window: index, shard, start, score, bucket."""
        return pd.DataFrame(
            {
                "index": np.arange(self.num_sequences),
                "shard": self.shard_index,
                "start": self.starts,
                "score": self.scores,
                "bucket": self.buckets,
            }
        )


def _as_shards(source: Any) -> list[np.ndarray]:
    if hasattr(source, "shards") and hasattr(source, "seq_len"):  # a ShuffledSequenceLoader
        return list(source.shards)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        source = [source]
    if not isinstance(source, Sequence) or not source:
        raise DataError(
            f"build_manifest: expected a loader, a token tensor/array or a list of them, got {source!r}"
        )
    out = []
    for i, s in enumerate(source):
        a = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"build_manifest: token array {i} must be 1-D integers, got {a.dtype} {a.shape}")
        out.append(a)
    return out


def build_manifest(
    loader_or_tokens: Any,
    seq_len: int,
    n_buckets: int = 8,
    score: str | ScoreFn = "unigram_entropy",
    rows_per_chunk: int = 4096,
) -> Manifest:
    """Cut the tokens into windows, score them, and bucket them easy → hard by score rank.

    ``loader_or_tokens``: a :class:`~qlab.data.ShuffledSequenceLoader` (its shards), a
    1-D token tensor/array, or a list of them. ``score``: a name in :data:`SCORES` or a
    function (n, seq_len + 1) int array → (n,) scores (lower = easier).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"build_manifest: seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ConfigError(f"build_manifest: n_buckets must be a positive integer, got {n_buckets!r}")
    if isinstance(score, str):
        if score not in SCORES:
            raise ConfigError(f"build_manifest: unknown score {score!r}; known: {sorted(SCORES)}")
        score_name, score_fn = score, SCORES[score]
    else:
        score_name, score_fn = getattr(score, "__name__", "custom"), score
    shards = _as_shards(loader_or_tokens)
    shard_index, starts, scores = [], [], []
    for si, tokens in enumerate(shards):
        n = max(0, (len(tokens) - 1) // seq_len)
        for lo in range(0, n, rows_per_chunk):
            first = np.arange(lo, min(n, lo + rows_per_chunk)) * seq_len
            windows = np.stack([tokens[s : s + seq_len + 1] for s in first]).astype(np.int64)
            chunk_scores = np.asarray(score_fn(windows), dtype=np.float64).reshape(-1)
            if chunk_scores.shape != (len(first),) or not np.isfinite(chunk_scores).all():
                raise DataError(
                    f"build_manifest: score {score_name!r} must give one finite number per window"
                )
            shard_index.append(np.full(len(first), si))
            starts.append(first)
            scores.append(chunk_scores)
    total = sum(len(s) for s in starts)
    if total < n_buckets:
        raise DataError(
            f"build_manifest: {total} windows of {seq_len + 1} tokens, fewer than {n_buckets} buckets"
        )
    scores_all = np.concatenate(scores)
    buckets = np.empty(total, dtype=np.int64)
    buckets[np.argsort(scores_all, kind="stable")] = np.arange(total) * n_buckets // total
    return Manifest(
        shards, seq_len, n_buckets, score_name, np.concatenate(shard_index), np.concatenate(starts),
        scores_all, buckets,
    )  # fmt: skip


# ---- the schedule ---------------------------------------------------------------------------


def _check_frac(frac: float) -> float:
    if isinstance(frac, bool) or not isinstance(frac, (int, float, np.floating)) or math.isnan(frac):
        raise ConfigError(f"curriculum: training fraction must be a number, got {frac!r}")
    return min(max(float(frac), 0.0), 1.0)  # wallclock may overshoot 1 by a step


def _check_buckets(n_buckets: int) -> None:
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ConfigError(f"curriculum n_buckets must be a positive integer, got {n_buckets!r}")


def crossfade_weights(frac: float, n_buckets: int) -> np.ndarray:
    """Pre-normalisation weights w_b(t) = (1 − t)(1 − b/(B−1)) + t·b/(B−1) (one bucket: [1])."""
    _check_buckets(n_buckets)
    t = _check_frac(frac)
    if n_buckets == 1:
        return np.ones(1)
    hard = np.arange(n_buckets) / (n_buckets - 1)
    return (1.0 - t) * (1.0 - hard) + t * hard


def bucket_probabilities(frac: float, n_buckets: int, floor: float = 0.05) -> np.ndarray:
    """p_b = floor + (1 − B·floor)·w_b/Σw: sums to 1, every bucket ≥ floor."""
    _check_buckets(n_buckets)
    ok = isinstance(floor, (int, float)) and not isinstance(floor, bool)
    if not (ok and floor >= 0.0 and floor * n_buckets <= 1.0 + 1e-12):
        raise ConfigError(
            f"curriculum floor must lie in [0, 1/n_buckets = {1 / n_buckets:.4g}], got {floor!r}"
        )
    w = crossfade_weights(frac, n_buckets)
    return floor + (1.0 - n_buckets * floor) * w / w.sum()


def schedule_table(fractions: Sequence[float], n_buckets: int = 8, floor: float = 0.05) -> pd.DataFrame:
    """Tidy schedule for the curriculum figure: frac, bucket, weight (pre-normalise), prob."""
    rows = []
    for t in fractions:
        w = crossfade_weights(t, n_buckets)
        p = bucket_probabilities(t, n_buckets, floor)
        rows += [{"frac": float(t), "bucket": b, "weight": w[b], "prob": p[b]} for b in range(n_buckets)]
    return pd.DataFrame(rows, columns=["frac", "bucket", "weight", "prob"])


# ---- the sampler ----------------------------------------------------------------------------


class CurriculumSampler:
    """Deterministic, resumable batches whose bucket mix follows :func:`bucket_probabilities`."""

    def __init__(
        self, manifest: Manifest, floor: float = 0.05, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"CurriculumSampler: need 0 ≤ rank < world_size, got {rank}/{world_size}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"CurriculumSampler: seed must be a non-negative integer, got {seed!r}")
        bucket_probabilities(0.0, manifest.n_buckets, floor)  # validates the floor
        self.manifest, self.floor, self.seed = manifest, float(floor), int(seed)
        self.rank, self.world_size = rank, world_size
        self.members = [manifest.members(b) for b in range(manifest.n_buckets)]
        self.calls = 0
        self.cursors = [0] * manifest.n_buckets  # sequences drawn so far from each bucket

    def weights(self, frac: float) -> np.ndarray:
        """Bucket sampling probabilities at training fraction ``frac``."""
        return bucket_probabilities(frac, self.manifest.n_buckets, self.floor)

    def schedule_table(self, fractions: Sequence[float]) -> pd.DataFrame:
        return schedule_table(fractions, self.manifest.n_buckets, self.floor)

    def _draw(self, bucket: int) -> int:
        members = self.members[bucket]
        epoch, offset = divmod(self.cursors[bucket], len(members))
        perm = np.random.Generator(np.random.PCG64([self.seed, 1, bucket, epoch])).permutation(len(members))
        self.cursors[bucket] += 1
        return int(members[perm[offset]])

    def sample_indices(self, batch_seqs: int, frac: float) -> np.ndarray:
        """This rank's manifest indices for the next batch; advances the global stream."""
        if isinstance(batch_seqs, bool) or not isinstance(batch_seqs, int) or batch_seqs < 1:
            raise ConfigError(f"CurriculumSampler: batch_seqs must be a positive integer, got {batch_seqs!r}")
        rng = np.random.Generator(np.random.PCG64([self.seed, 0, self.calls]))
        buckets = rng.choice(self.manifest.n_buckets, size=batch_seqs * self.world_size, p=self.weights(frac))
        self.calls += 1
        picks = np.array([self._draw(int(b)) for b in buckets], dtype=np.int64)
        return picks[self.rank * batch_seqs : (self.rank + 1) * batch_seqs]

    def next_batch(self, batch_seqs: int, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (batch_seqs, seq_len) sampled at training fraction ``frac``."""
        idx = self.sample_indices(batch_seqs, frac)
        window = torch.from_numpy(np.stack([self.manifest.window(i) for i in idx]).astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "floor": self.floor,
            "n_buckets": self.manifest.n_buckets,
            "num_sequences": self.manifest.num_sequences,
            "calls": self.calls,
            "cursors": list(self.cursors),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream; seed, floor and the manifest's shape must match."""
        mine = self.state_dict()
        for key in ("seed", "floor", "n_buckets", "num_sequences"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"curriculum state mismatch: {key} is {state.get(key)!r}, expected {mine[key]!r}"
                )
        cursors = state.get("cursors")
        if not isinstance(cursors, list) or len(cursors) != len(self.cursors):
            raise DataError(f"curriculum state: cursors must be a list of {len(self.cursors)} ints")
        self.calls, self.cursors = int(state["calls"]), [int(c) for c in cursors]

"""PR #1394's training data order, as ``--loader record``.

The record's loader differs from qlab's :class:`~qlab.data.loader.ShuffledSequenceLoader`
in four ways that change which tokens a run sees:

1. rank r reads only the shards ``files[r::world_size]`` (sorted by name);
2. its generator is ``PCG64(r)`` — seeded by the rank, *not* by SEED, so the record's
   five seeds trained on the same data order;
3. each shard is cut at a random phase in [0, seq_len − 1] (bounded by the shard's
   length), into ⌊(n − 1 − phase)/seq_len⌋ windows visited in a random permutation;
4. every sequence draws its shard with probability proportional to the windows that shard
   has left; when all are used up every shard is re-cut (new phase, new permutation).

Within a shard windows are taken from the end of the permuted list. The generator calls
happen in exactly the record's order (shards cut in order at start, then one ``choice``
per sequence), so the sequences are the record's for the same shard files.

Resuming replays the draws (no data is read), so a state is four integers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qlab.data.shards import read_shard
from qlab.errors import DataError


class RecordSequenceLoader:
    """The record's per-rank shuffled loader; same interface as ShuffledSequenceLoader."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len < 1:
            raise DataError(f"RecordSequenceLoader: seq_len must be ≥ 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"RecordSequenceLoader: need 0 ≤ rank < world_size, got {rank}/{world_size}")
        mine = sorted(str(f) for f in files)[rank::world_size]
        if not mine:
            raise DataError(f"RecordSequenceLoader: no shard for rank {rank}/{world_size} of {len(files)}")
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.files = mine
        self.shards = [read_shard(f, vocab_size=vocab_size) for f in mine]
        self.num_tokens = [len(s) for s in self.shards]
        short = [f for f, n in zip(mine, self.num_tokens, strict=True) if n < seq_len + 1]
        if short:
            raise DataError(f"RecordSequenceLoader: shards shorter than seq_len + 1 = {seq_len + 1}: {short}")
        self._restart()

    def _restart(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.rank))
        self.start_inds: list[list[int]] = [[] for _ in self.shards]
        for si in range(len(self.shards)):
            self._cut(si)
        self._remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
        self.drawn = 0

    def _cut(self, si: int) -> None:
        """A random phase, then the shard's windows in a random order."""
        n = self.num_tokens[si]
        max_phase = min(self.seq_len - 1, max(0, n - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        count = (n - 1 - phase) // self.seq_len
        order = self.rng.permutation(count)
        self.start_inds[si] = (phase + order * self.seq_len).tolist()

    def _draw(self) -> tuple[int, int]:
        """(shard, start) of the next sequence, advancing the generator as the record does."""
        total = self._remaining.sum()
        if total <= 0:
            for si in range(len(self.shards)):
                self._cut(si)
            self._remaining = np.array([len(s) for s in self.start_inds], dtype=np.float64)
            total = self._remaining.sum()
        si = int(self.rng.choice(len(self.shards), p=self._remaining / total))
        start = self.start_inds[si].pop()
        self._remaining[si] -= 1
        self.drawn += 1
        return si, start

    def next_batch(self, batch_seqs_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), int64 of shape (B, seq_len)."""
        if batch_seqs_per_rank < 1:
            raise DataError(f"next_batch: batch_seqs_per_rank must be ≥ 1, got {batch_seqs_per_rank}")
        rows = []
        for _ in range(batch_seqs_per_rank):
            si, start = self._draw()
            rows.append(self.shards[si][start : start + self.seq_len + 1])
        window = torch.from_numpy(np.stack(rows).astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "record",
            "drawn": self.drawn,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "num_tokens": sum(self.num_tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after ``drawn`` sequences by replaying the draws (no data is read)."""
        if not isinstance(state, dict) or state.get("kind") != "record":
            raise DataError("loader state: not a record-loader state (trained with --loader qlab?)")
        mine = {"rank": self.rank, "world_size": self.world_size, "seq_len": self.seq_len,
                "num_tokens": sum(self.num_tokens)}  # fmt: skip
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"loader state mismatch: {key} is {state.get(key)!r}, {value!r} now")
        drawn = state.get("drawn")
        if not isinstance(drawn, int) or isinstance(drawn, bool) or drawn < 0:
            raise DataError(f"loader state: drawn must be a non-negative int, got {drawn!r}")
        self._restart()
        for _ in range(drawn):
            self._draw()

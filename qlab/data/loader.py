"""Training batches from token shards, and the validation token stream.

The loader cuts every shard into windows of seq_len + 1 tokens starting at multiples of
seq_len (so targets never overlap and every token is predicted once per epoch), then
visits all windows of all shards in a seeded random order, epoch after epoch. The order
is a single global stream: global batch i is stream positions [i·W·B, (i+1)·W·B) and
rank r takes its r-th slice of B. Hence the union over ranks of world W equals rank 0 of
world 1 with batch W·B, and resuming from ``state_dict()`` replays the exact same batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qlab.data.shards import read_shard
from qlab.errors import DataError


class ShuffledSequenceLoader:
    """Deterministic, resumable, rank-sharded sampler of (x, y) sequence pairs."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if not files:
            raise DataError("ShuffledSequenceLoader: no shard files given")
        if seq_len < 1:
            raise DataError(f"ShuffledSequenceLoader: seq_len must be ≥ 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"ShuffledSequenceLoader: need 0 ≤ rank < world_size, got {rank}/{world_size}")
        self.seq_len, self.rank, self.world_size, self.seed = seq_len, rank, world_size, seed
        self.shards = [read_shard(f, vocab_size=vocab_size) for f in files]
        per_shard = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self.num_sequences = int(per_shard.sum())
        if self.num_sequences == 0:
            raise DataError(f"ShuffledSequenceLoader: shards hold no full sequence of {seq_len + 1} tokens")
        # first global sequence id of each shard, for mapping ids back to (shard, offset)
        self._shard_starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.position = 0  # global stream position, in sequences
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._epoch = rng.permutation(self.num_sequences), epoch
        return self._perm

    def _sequence(self, stream_pos: int) -> np.ndarray:
        epoch, offset = divmod(stream_pos, self.num_sequences)
        gid = int(self._permutation(epoch)[offset])
        shard = int(np.searchsorted(self._shard_starts, gid, side="right")) - 1
        start = (gid - int(self._shard_starts[shard])) * self.seq_len
        return self.shards[shard][start : start + self.seq_len + 1]

    def next_batch(self, batch_seqs_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), int64 of shape (B, seq_len); advances the global stream."""
        if batch_seqs_per_rank < 1:
            raise DataError(f"next_batch: batch_seqs_per_rank must be ≥ 1, got {batch_seqs_per_rank}")
        first = self.position + self.rank * batch_seqs_per_rank
        rows = [self._sequence(p) for p in range(first, first + batch_seqs_per_rank)]
        self.position += self.world_size * batch_seqs_per_rank
        window = torch.from_numpy(np.stack(rows).astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved stream position; the data, seed and seq_len must match."""
        for key in ("seed", "seq_len", "num_sequences"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state mismatch: {key} is {state.get(key)!r} in the state, "
                    f"{getattr(self, key)!r} for these shards"
                )
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise DataError(f"loader state: position must be a non-negative int, got {position!r}")
        self.position = position


def load_validation_tokens(
    files: Sequence[str | os.PathLike], seq_len: int, vocab_size: int | None = None
) -> torch.Tensor:
    """Concatenate validation shards and keep ⌊(N−1)/L⌋·L + 1 tokens (int64)."""
    if not files:
        raise DataError("load_validation_tokens: no validation shard files given")
    if seq_len < 1:
        raise DataError(f"load_validation_tokens: seq_len must be ≥ 1, got {seq_len}")
    tokens = np.concatenate([read_shard(f, vocab_size=vocab_size, mmap=False) for f in files])
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        names = ", ".join(str(f) for f in files)
        raise DataError(
            f"validation shards ({names}) hold {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))

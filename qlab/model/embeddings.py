"""Extra input embeddings the papers ablate: BigramHash and per-layer value embeddings.

BigramHash hashes each (previous, current) token pair into one of ``buckets`` rows of a
small table and projects that row to the model width; the result is added to the token
embedding. The first position has no previous token and uses the last bucket, which
no real pair hashes to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Odd multipliers that spread (prev, cur) pairs over the buckets.
_HASH_CUR = 36313
_HASH_PREV = 27191


def bigram_bucket_ids(idx: Tensor, buckets: int) -> Tensor:
    """Bucket id of each (previous, current) token pair; position 0 gets ``buckets − 1``.

    Pairs hash to ``(36313·cur XOR 27191·prev) mod (buckets − 1)``, so ids lie in
    [0, buckets − 2] and bucket ``buckets − 1`` is reserved for the sequence start.
    """
    idx = idx.long()
    cur = idx[:, 1:]
    prev = idx[:, :-1]
    pair = torch.bitwise_xor(_HASH_CUR * cur, _HASH_PREV * prev) % (buckets - 1)
    start = torch.full_like(idx[:, :1], buckets - 1)
    return torch.cat((start, pair), dim=1)


class BigramHash(nn.Module):
    """Hashed bigram embedding: (B, T) token ids → (B, T, model_dim).

    ``embed`` (buckets × dim) is initialised N(0, init_std) by the model; ``proj``
    (model_dim × dim) is zero-initialised so the feature starts as a no-op.
    """

    def __init__(self, buckets: int, dim: int, model_dim: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        return self.proj(self.embed(bigram_bucket_ids(idx, self.buckets)))

"""Reference scores a trained model must beat."""

from __future__ import annotations

import math

import torch

from qlab.data.tokenizer import ByteTables, token_bytes


def unigram_bpb(
    train_tokens: torch.Tensor, val_tokens: torch.Tensor, tables: ByteTables, vocab_size: int
) -> float:
    """Bits per byte of the add-one-smoothed unigram model fitted on ``train_tokens``.

    Scores every validation target (positions 1 … N−1) with −log₂ p(y), counting bytes
    with the same boundary / leading-space rule as the model evaluation. A model that
    learns anything about context must land below this number.
    """
    counts = torch.bincount(train_tokens.to(torch.int64).flatten(), minlength=vocab_size).double() + 1.0
    log2p = torch.log2(counts / counts.sum())
    val = val_tokens.to(torch.int64)
    prev, target = val[:-1], val[1:]
    bits = -log2p[target].sum().item()
    nbytes = token_bytes(tables, prev, target).double().sum().item()
    return bits / nbytes


def uniform_bpb(val_tokens: torch.Tensor, tables: ByteTables, vocab_size: int) -> float:
    """Bits per byte of a model that knows nothing: log₂ V bits for every token."""
    val = val_tokens.to(torch.int64)
    nbytes = token_bytes(tables, val[:-1], val[1:]).double().sum().item()
    return (val.numel() - 1) * math.log2(vocab_size) / nbytes

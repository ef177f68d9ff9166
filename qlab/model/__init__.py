"""The reference GPT (Parameter Golf baseline and record stack) and its building blocks."""

from qlab.model.attention import CausalSelfAttention, apply_rope, rope_tables, sliding_window_mask, xsa
from qlab.model.embeddings import BigramHash, bigram_bucket_ids
from qlab.model.gpt import (
    GPT,
    MLP,
    Block,
    looped_order,
    parameter_family,
    parameter_group,
    parameter_table,
    plain_order,
)

__all__ = [
    "GPT",
    "MLP",
    "BigramHash",
    "Block",
    "CausalSelfAttention",
    "apply_rope",
    "bigram_bucket_ids",
    "looped_order",
    "parameter_family",
    "parameter_group",
    "parameter_table",
    "plain_order",
    "rope_tables",
    "sliding_window_mask",
    "xsa",
]

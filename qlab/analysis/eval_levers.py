"""PR #1718's evaluation levers measured: evaluation length and sliding-window stride.

The float model is scored at ½L, L and 2L (L = its training length; NTK-scaled RoPE
beyond L) with standard windows and with sliding windows of stride L/2 and L/4. Each
configuration's Δbpb against standard windows at L is **paired** on the targets both
score — the scored positions differ between window layouts, so the reference's
per-token loss is looked up at the other's positions — with a bootstrap interval over
documents (:func:`qlab.analysis.marginal.paired_delta`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from torch import nn

from qlab.analysis.marginal import paired_delta
from qlab.eval.agreement import document_sums
from qlab.eval.bpb import token_scores

__all__ = ["eval_levers", "paired_on_common_tokens"]

Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (nll, bytes, target positions)


def paired_on_common_tokens(
    ref: Scores, other: Scores, tokens: torch.Tensor, bos_id: int = 1, n_boot: int = 1000
) -> tuple[float, float, float]:
    """``other``'s paired Δbpb against ``ref`` on the targets both scored, with the 95 %
    bootstrap interval over documents: (Δ, lo, hi)."""
    ref_nll = torch.full((tokens.numel(),), float("nan"), dtype=torch.float64)
    ref_nll[ref[2]] = ref[0].to(torch.float64)
    nll, nbytes, pos = other
    keep = torch.isfinite(ref_nll[pos])
    base_docs, docs, doc_bytes = document_sums(
        pos[keep], tokens, bos_id, ref_nll[pos][keep], nll[keep], nbytes[keep]
    )
    return paired_delta(base_docs, docs, doc_bytes, n_boot)


def eval_levers(
    model: nn.Module,
    val_tokens: torch.Tensor,
    byte_tables: Any,
    *,
    train_seq_len: int,
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """One row per (eval length, windows): ``val_bpb``, and ``delta_bpb`` with ``ci_lo`` /
    ``ci_hi`` paired against standard windows at ``train_seq_len``."""
    L = int(train_seq_len)
    strides = (None, L // 2, L // 4)
    configs = [(seq, s) for seq in (L // 2, L, 2 * L) for s in strides if s is None or s < seq]
    scores = {
        (seq, s): token_scores(model, val_tokens, byte_tables, seq_len=seq, stride=s, max_tokens=max_tokens)
        for seq, s in configs
    }
    ref = scores[(L, None)]
    rows = []
    for (seq, stride), score in scores.items():
        delta, lo, hi = paired_on_common_tokens(ref, score, val_tokens)
        nll, nbytes, _ = score
        rows.append({
            "source": "qlab", "eval_seq_len": seq, "stride": stride or 0,
            "windows": "standard" if stride is None else f"sliding, stride {stride}",
            "val_bpb": float(nll.sum() / math.log(2) / nbytes.sum()), "train_seq_len": L,
            "delta_bpb": delta, "ci_lo": lo, "ci_hi": hi,
        })  # fmt: skip
    return pd.DataFrame(rows)

"""Rate-aware GPTQ against plain GPTQ's clip-width frontier: artifact bytes against bpb.

Plain GPTQ trades bytes for bpb through the matrices' clip width k (a wider clip, fewer
distinct codes in use, fewer bytes, more error). Rate-aware GPTQ (``gptq_rate_lambda``)
keeps k and rounds each weight to the level minimising err²/[H⁻¹]jj + λ·(−log₂ p(q)).
Both frontiers are measured on one checkpoint with the Hessians collected once: the real
artifact bytes of each policy and its paired Δbpb against the base (plain GPTQ at the
base k) on the same validation tokens, with a bootstrap interval over documents — so a
gap between the curves can be read against its noise. :func:`bytes_saved_at_equal_bpb`
interpolates the plain frontier at each rate-aware point's Δbpb.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.analysis.marginal import measure_policy, paired_delta, paired_kl, scoring_inputs
from qlab.analysis.spectra import weight_family
from qlab.errors import ConfigError
from qlab.quant.policy import Policy, Rule

__all__ = ["PLAIN", "RATE_AWARE", "bytes_saved_at_equal_bpb", "gptq_variant", "rate_frontier"]

PLAIN = "plain GPTQ (k sweep)"
RATE_AWARE = "rate-aware GPTQ (λ sweep)"


def gptq_variant(
    policy: Policy, state_dict: Mapping[str, torch.Tensor], k: float, rate_lambda: float = 0.0
) -> Policy:
    """``policy`` with the clip width of every GPTQ matrix of ``state_dict`` set to ``k``
    and its rate weight to ``rate_lambda`` (one rule per tensor, put first); the
    embedding (the records' int8 k = 20) keeps its setting."""
    rules = []
    for name, t in state_dict.items():
        spec = policy.spec_for(name, t)
        if spec.method != "gptq" or weight_family(name) == "embedding":
            continue
        if "k" not in spec.clip_params:
            raise ConfigError(
                f"policy {policy.name}: tensor {name!r} has no clip width k to vary ({spec.clip})"
            )
        params = {**dict(spec.clip_params), "k": float(k)}
        rules.append(
            Rule(name, dataclasses.replace(spec, clip_params=params, gptq_rate_lambda=float(rate_lambda)))
        )
    if not rules:
        raise ConfigError(f"policy {policy.name}: no GPTQ matrix to vary")
    return Policy(f"{policy.name}:k{k:g}:lambda{rate_lambda:g}", rules + list(policy.rules), policy.default)


def rate_frontier(
    model: nn.Module,
    policy: Policy,
    hessians: Mapping[str, torch.Tensor],
    val_tokens: torch.Tensor,
    byte_tables: Any,
    *,
    seq_len: int,
    ks: Sequence[float] = (10.0, 11.5, 12.85, 14.5, 16.0, 20.0),
    lambdas: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
    base_k: float = 12.85,
    codec: str = "ans",
    n_boot: int = 1000,
    max_tokens: int | None = None,
    bos_id: int = 1,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per point of both frontiers: ``method`` (:data:`PLAIN` over ``ks``,
    :data:`RATE_AWARE` over ``lambdas`` at ``base_k``), ``k``, ``rate_lambda``,
    ``artifact_bytes`` (the real ``codec`` artifact), ``val_bpb``, and the paired
    ``delta_bpb`` with its 95 % bootstrap interval ``ci_lo``/``ci_hi`` against plain GPTQ
    at ``base_k`` (``base_bytes``, ``base_bpb``), and the paired change of KL to the float
    model ``delta_kl`` (bits per byte) with ``kl_lo``/``kl_hi``."""
    ev = scoring_inputs(val_tokens, byte_tables, seq_len, max_tokens, bos_id)
    sd = model.state_dict()
    base = measure_policy(model, gptq_variant(policy, sd, base_k), hessians, ev, codec)
    base_bpb = float(base.doc_nll.sum() / np.log(2) / ev["doc_bytes"].sum())
    points = [(PLAIN, float(k), 0.0) for k in ks]
    points += [(RATE_AWARE, float(base_k), float(lam)) for lam in lambdas]
    rows = []
    for method, k, lam in tqdm(points, desc="frontier", disable=not progress):
        m = measure_policy(model, gptq_variant(policy, sd, k, lam), hessians, ev, codec)
        delta, lo, hi = paired_delta(base.doc_nll, m.doc_nll, ev["doc_bytes"], n_boot)
        dkl, kl_lo, kl_hi = paired_kl(base, m, ev["doc_bytes"], n_boot)
        rows.append({
            "method": method, "k": k, "rate_lambda": lam, "artifact_bytes": m.nbytes,
            "val_bpb": base_bpb + delta, "delta_bpb": delta, "ci_lo": lo, "ci_hi": hi,
            "delta_kl": dkl, "kl_lo": kl_lo, "kl_hi": kl_hi, "base_bytes": base.nbytes, "base_bpb": base_bpb,
        })  # fmt: skip
    return pd.DataFrame(rows)


# The frontier's two quality signals: column of the paired change and of its interval.
SIGNALS = {"bpb": ("delta_bpb", "ci_lo", "ci_hi"), "kl": ("delta_kl", "kl_lo", "kl_hi")}


def bytes_saved_at_equal_bpb(frontier: pd.DataFrame, signal: str = "bpb") -> pd.DataFrame:
    """For each rate-aware point inside the plain frontier's bpb range: the plain
    frontier's bytes at the same Δbpb (linear interpolation between its points sorted by
    Δbpb) and the relative saving ``1 − bytes / plain_bytes`` (positive = rate-aware
    smaller), with the point's own Δbpb interval (``ci_lo``/``ci_hi``): a saving whose
    interval spans the plain curve's Δbpb range nearby is not resolved. Points outside the
    range are dropped, not extrapolated. ``signal="kl"`` does the same at equal KL to the
    float model (columns ``delta_kl``, ``kl_lo``, ``kl_hi``)."""
    if signal not in SIGNALS:
        raise ConfigError(f"signal must be one of {sorted(SIGNALS)}, got {signal!r}")
    value, lo, hi = SIGNALS[signal]
    plain = frontier[frontier["method"] == PLAIN].sort_values(value)
    rate = frontier[frontier["method"] == RATE_AWARE]
    x, y = plain[value].to_numpy(float), plain["artifact_bytes"].to_numpy(float)
    rows = []
    for _, r in rate.iterrows():
        d = float(r[value])
        if len(x) >= 2 and x[0] <= d <= x[-1]:
            ref = float(np.interp(d, x, y))
            rows.append({"rate_lambda": float(r["rate_lambda"]), value: d, lo: float(r[lo]), hi: float(r[hi]),
                         "artifact_bytes": int(r["artifact_bytes"]), "plain_bytes": ref,
                         "saving": 1.0 - float(r["artifact_bytes"]) / ref})  # fmt: skip
    return pd.DataFrame(
        rows, columns=["rate_lambda", value, lo, hi, "artifact_bytes", "plain_bytes", "saving"]
    )

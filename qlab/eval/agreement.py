"""How far a changed model (quantized, pruned, fine-tuned) is from its reference, token by
token: KL divergence of the next-token distributions, top-1 agreement, Δ log-likelihood.

Δbpb compares two models through the text: each document's own difficulty enters both
sides and cancels only on average, so its per-document noise is large. The KL divergence
KL(p_ref ‖ p_model) compares the two distributions at every position directly (what
llama.cpp's ``perplexity --kl-divergence`` reports): the text only chooses where to look.
All three are summed per document (the stream cut before each BOS token) and their
intervals come from resampling documents.

Units: ``kl_bpb`` is Σ KL in bits over Σ bytes — bits per byte like bpb, so a KL change
of 0.001 is "1 mBPB-equivalent"; ``kl_bits`` is the mean KL per token in bits;
``delta_bpb`` is (Σ nll_model − Σ nll_ref) / ln 2 / Σ bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qlab.data.tokenizer import ByteTables, token_bytes
from qlab.errors import ConfigError
from qlab.eval.bpb import scored_batches, tables_on, target_positions
from qlab.model.modes import eval_mode

__all__ = [
    "TokenAgreement",
    "agreement_summary",
    "docs_to_resolve",
    "document_sums",
    "ratio_interval",
    "token_agreement",
    "token_kl_bits",
]

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass
class TokenAgreement:
    """Per scored token (CPU): KL(p_ref ‖ p_model) in bits, top-1 agreement, both NLLs in
    nats, the target's bytes and its index in the token stream."""

    kl_bits: torch.Tensor
    top1: torch.Tensor
    nll: torch.Tensor
    ref_nll: torch.Tensor
    bytes: torch.Tensor
    positions: torch.Tensor


def token_kl_bits(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) ‖ softmax(logits)) in bits over the last axis, in float64."""
    log_ref = F.log_softmax(ref_logits.double(), dim=-1)
    log_q = F.log_softmax(logits.double(), dim=-1)
    return (log_ref.exp() * (log_ref - log_q)).sum(-1).clamp_min(0.0) / math.log(2)


@torch.no_grad()
def token_agreement(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    val_tokens: torch.Tensor,
    byte_tables: ByteTables,
    *,
    seq_len: int,
    batch_seqs: int = 8,
    stride: int | None = None,
    max_tokens: int | None = None,
    reference_cache: dict[int, torch.Tensor] | None = None,
) -> TokenAgreement:
    """Both models on the same windows (the ones :func:`~qlab.eval.bpb.evaluate_bpb` scores
    with this ``stride``); ``model(x)`` and ``reference(x)`` return logits (B, T, V).

    ``reference_cache`` (a dict the caller keeps) holds the reference's logits per batch
    across calls, so comparing many variants with one reference runs it once — while the
    logits of all batches fit REFERENCE_CACHE_BYTES; past that they are recomputed."""
    device = next(model.parameters()).device
    tables = tables_on(byte_tables, device)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("kl", "top1", "nll", "ref", "bytes", "pos")}
    with eval_mode(model), eval_mode(reference):
        for b in scored_batches(val_tokens, seq_len, batch_seqs, stride, max_tokens, device):
            x, y, mask, batch = b.x, b.y, b.mask, b.windows
            logits = model(x).double()
            ref_logits = _reference_logits(reference, x, b.start, reference_cache, b.total * x.shape[1])
            if logits.shape != ref_logits.shape:
                raise ConfigError(
                    f"the model's logits {tuple(logits.shape)} and the reference's {tuple(ref_logits.shape)} "
                    "differ: agreement needs the same vocabulary"
                )
            keep = mask
            parts["kl"].append(token_kl_bits(ref_logits, logits)[keep].cpu())
            parts["top1"].append((logits.argmax(-1) == ref_logits.argmax(-1))[keep].cpu())
            parts["nll"].append(F.cross_entropy(logits.transpose(1, 2), y, reduction="none")[keep].cpu())
            parts["ref"].append(F.cross_entropy(ref_logits.transpose(1, 2), y, reduction="none")[keep].cpu())
            parts["bytes"].append(token_bytes(tables, x, y).double()[keep].cpu())
            parts["pos"].append(target_positions(batch, x.shape[1])[keep.cpu()])
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return TokenAgreement(cat["kl"], cat["top1"], cat["nll"], cat["ref"], cat["bytes"], cat["pos"])


# Bytes of reference logits (float32) a cache may hold: the demo's validation split at a
# 1,024-token vocabulary takes ~190 MB.
REFERENCE_CACHE_BYTES = 512 << 20


def _reference_logits(
    reference: torch.nn.Module,
    x: torch.Tensor,
    key: int,
    cache: dict[int, torch.Tensor] | None,
    positions: int,
) -> torch.Tensor:
    if cache is not None and key in cache:
        return cache[key].to(x.device).double()
    logits = reference(x)
    if cache is not None and positions * logits.shape[-1] * 4 <= REFERENCE_CACHE_BYTES:
        cache[key] = logits.float().cpu()
    return logits.double()


def document_sums(
    positions: torch.Tensor, tokens: torch.Tensor, bos_id: int, *values: torch.Tensor
) -> tuple[np.ndarray, ...]:
    """Each of ``values`` (one entry per scored token) summed per document: the stream is
    cut before each BOS token and a token belongs to the document its target is in."""
    starts = torch.cumsum((tokens.to(torch.int64) == bos_id).to(torch.int64), 0)[positions]
    doc_of = (starts - starts.min()).numpy()
    n = int(doc_of.max()) + 1 if doc_of.size else 0
    return tuple(np.bincount(doc_of, weights=v.double().numpy(), minlength=n) for v in values)


def ratio_interval(
    num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(Σ num / Σ den, 2.5 %, 97.5 % bootstrap quantiles) resampling documents."""
    value = float(num.sum() / den.sum())
    if n_boot <= 0 or num.size < 2:
        return value, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(n_boot, num.size))
    lo, hi = np.quantile(num[idx].sum(1) / den[idx].sum(1), [0.025, 0.975])
    return value, float(lo), float(hi)


def docs_to_resolve(num: np.ndarray, den: np.ndarray, effect: float) -> float:
    """Documents needed for the 95 % interval of Σ num / Σ den to be ± ``effect`` wide,
    from the per-document spread of these documents (the ratio's linearised variance:
    z_i = (num_i − r·den_i) / mean(den), Var(r̂) ≈ Var(z) / n)."""
    if num.size < 2 or effect <= 0:
        return float("nan")
    r = num.sum() / den.sum()
    z = (num - r * den) / den.mean()
    return float((Z95 * z.std(ddof=1) / effect) ** 2)


def agreement_summary(
    ta: TokenAgreement, tokens: torch.Tensor, bos_id: int = 1, n_boot: int = 1000, effect: float = 1e-3
) -> dict[str, float]:
    """KL, top-1 agreement and Δ log-likelihood with 95 % document-bootstrap intervals,
    and for each the documents needed to resolve ± ``effect`` (default 1 mBPB-equivalent)."""
    kl, top1, dnll, nbytes, count = document_sums(
        ta.positions, tokens, bos_id, ta.kl_bits, ta.top1, (ta.nll - ta.ref_nll) / math.log(2), ta.bytes,
        torch.ones_like(ta.kl_bits),
    )  # fmt: skip
    out: dict[str, float] = {
        "docs": float(kl.size),
        "tokens": float(count.sum()),
        "bytes": float(nbytes.sum()),
    }
    for name, (num, den) in {
        "kl_bpb": (kl, nbytes), "kl_bits": (kl, count), "top1": (top1, count), "delta_bpb": (dnll, nbytes),
    }.items():  # fmt: skip
        value, lo, hi = ratio_interval(num, den, n_boot)
        out |= {name: value, f"{name}_lo": lo, f"{name}_hi": hi}
    out["resolve_docs_bpb"] = docs_to_resolve(dnll, nbytes, effect)
    out["resolve_docs_kl"] = docs_to_resolve(kl, nbytes, effect)
    return out

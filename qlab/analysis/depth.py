"""What happens along depth: per-block hidden-state statistics, logit lens, sensitivity.

Uses the qlab GPT contract: ``block_outputs(idx)`` (residual stream after each
*executed* block), ``norm_and_logits(x)`` (final norm + head + softcap, the logit lens)
and ``forward(idx)`` → logits.

* :func:`depth_trajectory` — PR #2011 §13.2: mean ‖h‖₂ over tokens and "kurtosis" =
  mean over tokens of the excess kurtosis across that token's d coordinates (the PR's
  definition; ``kurtosis_pooled`` pools all coordinates instead), plus the logit-lens
  loss of every block scored on ``targets``.
* :func:`layer_sensitivity` — quantize one block's matrices at a time with a user
  ``quantize_fn(name, w) -> w_hat``, score, restore the exact original weights.

Scores: ``loss`` is the mean NLL in nats/token. Bits per byte need the bytes of each
target token (``bytes_per_token``, same shape as ``targets``) or their total
(``total_bytes``): BPB = Σ NLL / ln 2 / Σ bytes (float64). Without either, the column is
``bits_per_token`` instead of ``bpb``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qlab.analysis.geometry import excess_kurtosis, token_kurtosis
from qlab.analysis.spectra import layer_index, weight_family
from qlab.errors import ConfigError, DataError, NumericalError, QuantError
from qlab.model.modes import block_outputs, eval_mode, norm_and_logits

__all__ = ["depth_trajectory", "layer_sensitivity", "BLOCK_FAMILIES"]

BLOCK_FAMILIES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


def _byte_total(
    targets: torch.Tensor, bytes_per_token: torch.Tensor | None, total_bytes: float | None
) -> float | None:
    if bytes_per_token is not None and total_bytes is not None:
        raise ConfigError("give bytes_per_token or total_bytes, not both")
    if bytes_per_token is not None:
        b = torch.as_tensor(bytes_per_token)
        if b.shape != targets.shape:
            raise DataError(
                f"bytes_per_token shape {tuple(b.shape)} must equal targets shape {tuple(targets.shape)}"
            )
        total = float(b.double().sum())
    elif total_bytes is not None:
        total = float(total_bytes)
    else:
        return None
    if not math.isfinite(total) or total <= 0:
        raise DataError(f"total byte count must be a positive number, got {total}")
    return total


def _check_targets(idx: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise DataError(f"targets must have the shape of idx {tuple(idx.shape)}, got {got}")
    if targets.is_floating_point():
        raise DataError(f"targets must be integer token ids, got dtype {targets.dtype}")


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if logits.shape[:-1] != targets.shape:
        raise DataError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= logits.shape[-1]:
        raise DataError(f"target ids must lie in [0, {logits.shape[-1]}), got range [{lo}, {hi}]")
    nll = F.cross_entropy(logits.flatten(0, -2).double(), targets.flatten().long(), reduction="sum")
    value = float(nll)
    if not math.isfinite(value):
        raise NumericalError("loss is not finite (NaN/Inf logits)")
    return value


def _scores(nll: float, n_tokens: int, total_bytes: float | None, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}loss": nll / n_tokens}
    if total_bytes is None:
        out[f"{prefix}bits_per_token"] = nll / math.log(2) / n_tokens
    else:
        out[f"{prefix}bpb"] = nll / math.log(2) / total_bytes
    return out


def _block_labels(model: nn.Module, n_out: int) -> list[int | None]:
    """Physical block index of each executed position, from ``model.layer_order`` if any."""
    order = getattr(model, "layer_order", None)
    if callable(order):
        order = order()
    if isinstance(order, tuple) and len(order) == 2:
        flat = [*order[0], *order[1]]
        if len(flat) == n_out:
            return [int(i) for i in flat]
    return list(range(n_out)) if n_out == len(getattr(model, "blocks", [])) else [None] * n_out


def depth_trajectory(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    bytes_per_token: torch.Tensor | None = None,
    total_bytes: float | None = None,
) -> pd.DataFrame:
    """One row per executed block: ``position``, ``block``, ``mean_norm``, ``norm_var``,
    ``kurtosis`` (PR #2011), ``kurtosis_pooled``, ``max_abs`` and, with ``targets``, the
    logit-lens ``lens_loss`` and ``lens_bpb`` (or ``lens_bits_per_token``)."""
    if not callable(getattr(model, "block_outputs", None)):
        raise ConfigError(f"{type(model).__name__} has no block_outputs(idx); depth needs the GPT contract")
    if targets is not None:
        _check_targets(idx, targets)
        if not callable(getattr(model, "norm_and_logits", None)):
            raise ConfigError(f"{type(model).__name__} has no norm_and_logits(x); logit lens unavailable")
    total = _byte_total(targets, bytes_per_token, total_bytes) if targets is not None else None

    def run() -> list[dict]:
        outs = block_outputs(model, idx)
        labels = _block_labels(model, len(outs))
        rows = []
        for pos, (x, blk) in enumerate(zip(outs, labels)):
            h = x.detach().double().reshape(-1, x.shape[-1])
            if not bool(torch.isfinite(h).all()):
                raise NumericalError(f"block output {pos} contains NaN or Inf")
            norms = torch.linalg.vector_norm(h, dim=1)
            row = {
                "position": pos,
                "block": blk,
                "mean_norm": float(norms.mean()),
                "norm_var": float(norms.var()) if norms.numel() > 1 else float("nan"),
                "kurtosis": float(token_kurtosis(h).mean()),
                "kurtosis_pooled": excess_kurtosis(h),
                "max_abs": float(h.abs().max()),
            }
            if targets is not None:
                nll = _nll_sum(norm_and_logits(model, x), targets)
                row |= _scores(nll, targets.numel(), total, prefix="lens_")
            rows.append(row)
        return rows

    with eval_mode(model), torch.no_grad():
        return pd.DataFrame(run())


def _block_params(
    model: nn.Module, families: Iterable[str], include_embedding: bool
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    fams = set(families)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        fam = weight_family(name)
        if p.ndim != 2 or fam is None:
            continue
        if fam == "embedding":
            if include_embedding:
                groups.setdefault("embedding", []).append((name, p))
            continue
        i = layer_index(name)
        if i is not None and fam in fams:
            groups.setdefault(f"block_{i}", []).append((name, p))
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] == "embedding", _group_block(kv[0]) or 0)))


def _group_block(group: str) -> int | None:
    return int(group.split("_")[1]) if group.startswith("block_") else None


def _apply(name: str, p: nn.Parameter, quantize_fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    w_hat = quantize_fn(name, p.detach().clone())
    if not isinstance(w_hat, torch.Tensor) or w_hat.shape != p.shape:
        got = tuple(w_hat.shape) if isinstance(w_hat, torch.Tensor) else type(w_hat).__name__
        raise QuantError(f"quantize_fn returned {got} for {name!r}, expected shape {tuple(p.shape)}")
    if not bool(torch.isfinite(w_hat).all()):
        raise QuantError(f"quantize_fn returned NaN/Inf for {name!r}")
    p.data.copy_(w_hat.to(p.dtype))


def layer_sensitivity(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    quantize_fn: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    bytes_per_token: torch.Tensor | None = None,
    total_bytes: float | None = None,
    families: Iterable[str] = BLOCK_FAMILIES,
    include_embedding: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Δ loss (and Δ bpb / Δ bits-per-token) from quantizing one block at a time.

    For each block, every matrix of the given ``families`` is replaced by
    ``quantize_fn(name, w)``, the batch is scored with ``model(idx)`` and the original
    weights are copied back bit-exactly (verified). ``include_embedding`` adds a row for
    the embedding/head matrices. Rows: ``group``, ``block``, ``n_matrices``, ``n_params``,
    ``loss``, ``delta_loss``, ``bpb``/``bits_per_token`` and its ``delta_``.
    """
    _check_targets(idx, targets)
    total = _byte_total(targets, bytes_per_token, total_bytes)
    groups = _block_params(model, families, include_embedding)
    if not groups:
        raise ConfigError(f"model has no block matrices of families {sorted(set(families))}")

    def score() -> dict[str, float]:
        with eval_mode(model), torch.no_grad():
            nll = _nll_sum(model(idx), targets)
        return _scores(nll, targets.numel(), total)

    base = score()
    rows = []
    for group, params in tqdm(groups.items(), disable=not progress, desc="layer sensitivity"):
        originals = [p.detach().clone() for _, p in params]
        try:
            for name, p in params:
                _apply(name, p, quantize_fn)
            s = score()
        finally:
            with torch.no_grad():
                for (_, p), orig in zip(params, originals):
                    p.data.copy_(orig)
        if not all(torch.equal(p.detach(), o) for (_, p), o in zip(params, originals)):
            raise NumericalError(f"weights of {group} were not restored exactly")
        row = {
            "group": group,
            "block": _group_block(group),
            "n_matrices": len(params),
            "n_params": sum(p.numel() for _, p in params),
        }
        for key, val in s.items():
            row[key] = val
            row[f"delta_{key}"] = val - base[key]
        rows.append(row)
    return pd.DataFrame(rows)

"""What each bit costs: Δbytes and paired Δbpb of changing one tensor group's setting.

For a checkpoint and a base policy, each group of quantized tensors (by family, by layer
× family, or any name patterns) gets one change at a time — one bit more or less, a
narrower or wider clip width k — and the whole model is quantized again (same code path
as ``qlab quantize``, Hessians collected once and reused) and evaluated on the same
validation tokens. Per row:

* Δbytes: the real artifact (``codec``, default the symbol coder) minus the base's;
* Δbpb, **paired** against the base on the same tokens, with a bootstrap interval over
  documents (the validation stream cut at BOS tokens): resample documents, recompute
  Σ Δnll / (ln 2 · Σ bytes);
* ``resolved``: whether the interval excludes 0 — an unresolved effect is drawn as such;
* mBPB per kB: Δbpb·1000 / (Δbytes/1000), the exchange rate between bytes and bits;
* ΔKL (``delta_kl``, ``kl_lo``/``kl_hi``, ``kl_resolved``): the variant's KL divergence
  from the float model minus the base's, in bits per byte (bpb's units), paired per
  document — the quiet signal of the same change (:mod:`qlab.eval.agreement`);
  ``choose_settings(value="delta_kl")`` allocates on it;
* Δ Hessian error: Σ over the group of tr(ΔW H ΔWᵀ) (variant minus base), the
  second-order proxy ½·ΔwᵀHΔw of the loss change up to a constant, from which
  :func:`fit_predictor` predicts Δbpb without evaluating (slopes fitted on measured rows:
  one for the tied embedding, one for the block matrices, by default).

One variant is quantized and evaluated at a time; with ``out`` every finished row is
written at once and a rerun skips the rows already there (resume after a kill). A
setting that changes nothing (one bit more on an int8 group: bits stay in 2..8) is
skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.analysis.rd import hessian_error, tensor_family
from qlab.analysis.spectra import layer_index
from qlab.compress.container import encode_artifact
from qlab.errors import ConfigError
from qlab.eval.agreement import document_sums, ratio_interval, token_agreement
from qlab.io.atomic import atomic_write_text
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import Policy, Rule, TensorSpec
from qlab.quant.tensor import QuantizedTensor, dequantize

__all__ = [
    "SETTINGS", "Measured", "group_tensors", "paired_delta", "paired_kl", "marginal_table", "fit_predictor",
    "predict_delta_bpb",
]  # fmt: skip

# Relative changes of a group's spec: bits ± 1, clip width k × 0.8 / × 1.25.
SETTINGS = ("bits+1", "bits-1", "k*0.8", "k*1.25")
COLUMNS = ["group", "setting", "tensors", "numel", "base_bytes", "delta_bytes", "base_bpb", "delta_bpb",
           "ci_lo", "ci_hi", "resolved", "mbpb_per_kb", "delta_hessian_err", "delta_kl", "kl_lo", "kl_hi",
           "kl_resolved"]  # fmt: skip


def group_tensors(
    quantized_state: Mapping[str, Any], grouping: str | Mapping[str, Iterable[str]] = "family"
) -> dict[str, list[str]]:
    """Group the quantized tensors: ``"family"``, ``"layer_family"`` or {group: name patterns}."""
    names = [n for n, v in quantized_state.items() if isinstance(v, QuantizedTensor)]
    groups: dict[str, list[str]] = {}
    for name in names:
        if grouping == "family":
            key = tensor_family(name)
        elif grouping == "layer_family":
            layer = layer_index(name)
            key = f"{'-' if layer is None else layer}:{tensor_family(name)}"
        elif isinstance(grouping, Mapping):
            found = next((g for g, pats in grouping.items() if any(fnmatchcase(name, p) for p in pats)), None)
            if found is None:
                continue
            key = found
        else:
            raise ConfigError(f"grouping must be 'family', 'layer_family' or a mapping, got {grouping!r}")
        groups.setdefault(key, []).append(name)
    if not groups:
        raise ConfigError("marginal table: the base policy quantizes no tensor of these groups")
    return groups


def paired_kl(
    base: Measured, other: Measured, doc_bytes: np.ndarray, n_boot: int = 1000
) -> tuple[float, float, float]:
    """(ΔKL, 2.5 %, 97.5 %): ``other``'s KL to the float model minus ``base``'s, in bits per
    byte (the units of Δbpb), paired per document: the quiet signal of the same change."""
    return ratio_interval(other.doc_kl - base.doc_kl, doc_bytes, n_boot)


def paired_delta(
    base_nll: np.ndarray, nll: np.ndarray, doc_bytes: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(Δbpb, 2.5 %, 97.5 % bootstrap quantiles) of ``nll`` against ``base_nll``, per document."""
    return ratio_interval((nll - base_nll) / math.log(2), doc_bytes, n_boot, seed)


_BITS = re.compile(r"^bits([+-]\d+)$")
_K = re.compile(r"^k\*(\d+(?:\.\d+)?)$")


def changed_spec(spec: TensorSpec, setting: str) -> TensorSpec:
    """``spec`` with ``setting`` applied: ``bits+N`` / ``bits-N`` (kept in 2..8) or ``k*F``."""
    if m := _BITS.match(setting):
        return dataclasses.replace(spec, bits=min(8, max(2, spec.bits + int(m.group(1)))))
    if m := _K.match(setting):
        params = dict(spec.clip_params)
        if "k" not in params:
            raise ConfigError(f"setting {setting!r} needs a clip rule with a k (got {spec.clip})")
        return dataclasses.replace(spec, clip_params={**params, "k": params["k"] * float(m.group(1))})
    raise ConfigError(f"unknown setting {setting!r}; known forms: bits+N, bits-N, k*F")


def variant_policy(
    policy: Policy, names: Iterable[str], setting: str, shapes: Mapping[str, torch.Tensor]
) -> Policy:
    """``policy`` with ``setting`` applied to exactly ``names`` (rules put first)."""
    rules = [Rule(name, changed_spec(policy.spec_for(name, shapes[name]), setting)) for name in names]
    return Policy(f"{policy.name}:{setting}", rules + list(policy.rules), policy.default)


@dataclass
class Measured:
    """One policy measured on the validation documents: real artifact bytes, Σ NLL (nats)
    and Σ KL to the float model (bits) per document, and the quantized state."""

    nbytes: int
    doc_nll: np.ndarray
    doc_kl: np.ndarray
    state: dict


def measure_policy(model: nn.Module, policy: Policy, hessians: Mapping, ev: dict, codec: str) -> Measured:
    """``model`` (the float reference) quantized under ``policy``, its artifact encoded and
    its quantized model scored token by token against ``model`` itself."""
    nbytes, qm = _encoded(model, policy, hessians, codec)
    ta = token_agreement(
        qm.dequantized_model, model, ev["tokens"], ev["tables"], seq_len=ev["seq_len"],
        max_tokens=ev["max_tokens"], reference_cache=ev.setdefault("reference_cache", {}),
    )  # fmt: skip
    doc_nll, doc_kl, doc_bytes = document_sums(
        ta.positions, ev["tokens"], ev["bos"], ta.nll, ta.kl_bits, ta.bytes
    )
    ev.setdefault("doc_bytes", doc_bytes)  # the same tokens every time: one byte count per document
    return Measured(nbytes, doc_nll, doc_kl, qm.quantized_state)


def measure_bytes(model: nn.Module, policy: Policy, hessians: Mapping, codec: str) -> tuple[int, dict]:
    """(artifact bytes, quantized state) of ``model`` under ``policy``: no forward pass."""
    nbytes, qm = _encoded(model, policy, hessians, codec)
    return nbytes, qm.quantized_state


def _encoded(model: nn.Module, policy: Policy, hessians: Mapping, codec: str) -> tuple[int, Any]:
    qm = quantize_model(model, policy, hessians=hessians)
    return len(encode_artifact(qm.quantized_state, policy=policy.to_dict(), codec=codec)), qm


def scoring_inputs(val_tokens: torch.Tensor, byte_tables: Any, seq_len: int, max_tokens: int | None,
                 bos_id: int) -> dict[str, Any]:  # fmt: skip
    """What :func:`measure_policy` scores on; it adds ``doc_bytes`` (the same every time) on first use."""
    return {
        "tokens": val_tokens,
        "tables": byte_tables,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "bos": bos_id,
    }


def marginal_table(
    model: nn.Module,
    policy: Policy,
    val_tokens: torch.Tensor,
    byte_tables: Any,
    hessians: Mapping[str, torch.Tensor],
    *,
    seq_len: int,
    grouping: str | Mapping[str, Iterable[str]] = "family",
    settings: Iterable[str] = SETTINGS,
    codec: str = "ans",
    bos_id: int = 1,
    n_boot: int = 1000,
    max_tokens: int | None = None,
    out: str | os.PathLike | None = None,
    evaluate: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per group × setting (see the module doc); ``out`` makes it resumable.

    ``evaluate=False`` skips every forward pass: the rows hold the real Δbytes and the
    Δ Hessian error, with Δbpb and its interval NaN — the table
    :func:`predict_delta_bpb` completes from a predictor fitted on a few measured rows,
    for models where evaluating every variant is too slow."""
    ev = scoring_inputs(val_tokens, byte_tables, seq_len, max_tokens, bos_id)
    base = None
    if evaluate:
        base = measure_policy(model, policy, hessians, ev, codec)
        base_bytes, base_state = base.nbytes, base.state
        base_bpb = float(base.doc_nll.sum() / math.log(2) / ev["doc_bytes"].sum())
    else:
        (base_bytes, base_state), base_bpb = measure_bytes(model, policy, hessians, codec), math.nan
    shapes = dict(model.state_dict())
    groups = group_tensors(base_state, grouping)
    base_err = _hessian_errors(shapes, base_state, hessians, [n for g in groups.values() for n in g])
    done = _read_rows(out, base_bytes)
    rows = list(done.values())
    todo = [(g, s) for g in groups for s in settings
            if (g, s) not in done and _changes(policy, groups[g], s, shapes)]  # fmt: skip
    for group, setting in tqdm(todo, desc="marginal", disable=not progress):
        names = groups[group]
        variant = variant_policy(policy, names, setting, shapes)
        delta, lo, hi, dkl, kl_lo, kl_hi = (math.nan,) * 6
        if base is not None:
            m = measure_policy(model, variant, hessians, ev, codec)
            nbytes, state = m.nbytes, m.state
            delta, lo, hi = paired_delta(base.doc_nll, m.doc_nll, ev["doc_bytes"], n_boot)
            dkl, kl_lo, kl_hi = paired_kl(base, m, ev["doc_bytes"], n_boot)
        else:
            nbytes, state = measure_bytes(model, variant, hessians, codec)
        err = _hessian_errors(shapes, state, hessians, names)
        rows.append({
            "group": group, "setting": setting, "tensors": len(names),
            "numel": int(sum(shapes[n].numel() for n in names)), "base_bytes": base_bytes,
            "delta_bytes": nbytes - base_bytes, "base_bpb": base_bpb, "delta_bpb": delta,
            "ci_lo": lo, "ci_hi": hi,
            "resolved": bool(lo > 0 or hi < 0), "mbpb_per_kb": _rate(delta, nbytes - base_bytes),
            "delta_hessian_err": sum(err[n] - base_err[n] for n in names),
            "delta_kl": dkl, "kl_lo": kl_lo, "kl_hi": kl_hi, "kl_resolved": bool(kl_lo > 0 or kl_hi < 0),
        })  # fmt: skip
        if out is not None:
            atomic_write_text(out, pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
    return pd.DataFrame(rows, columns=COLUMNS)


def _hessian_errors(
    weights: Mapping[str, torch.Tensor], state: Mapping[str, Any], hessians: Mapping, names: Iterable[str]
) -> dict[str, float]:
    """tr(ΔW H ΔWᵀ) of each named quantized tensor that has a Hessian (0 for those without)."""
    out = {}
    for n in names:
        q = state[n]
        h = hessians.get(n)
        out[n] = (
            0.0
            if h is None
            else hessian_error(weights[n].float(), dequantize(q).reshape(weights[n].shape), h)
        )
    return out


#: How :func:`fit_predictor` shares slopes between groups: ``"hessian"`` (default) fits one
#: slope for the groups whose Hessian is that of the final hidden state (the tied
#: embedding, reached as the LM head) and one for the block matrices (Hessians of their
#: inputs) — the two do not share a scale, and the embedding's error also enters as the
#: input embedding, which its Hessian does not see; ``"shared"`` one slope for all;
#: ``"group"`` one slope per group.
SLOPES = ("hessian", "shared", "group")


def _slope_keys(table: pd.DataFrame, slopes: str) -> list[str]:
    groups = table["group"].astype(str)
    if slopes == "shared":
        return ["all"] * len(table)
    if slopes == "group":
        return list(groups)
    if slopes == "hessian":
        return ["embedding" if "embedding" in g else "matrices" for g in groups]
    raise ConfigError(f"slopes must be one of {SLOPES}, got {slopes!r}")


def _design(x: np.ndarray, keys: list[str], names: list[str]) -> np.ndarray:
    """Columns x·[key = k] for each k in ``names``, then the shared intercept."""
    k = np.asarray(keys)
    return np.column_stack([x * (k == n) for n in names] + [np.ones(len(x))])


def fit_predictor(table: pd.DataFrame, slopes: str = "hessian") -> dict[str, Any]:
    """Δbpb ≈ a_s · Δtr(ΔW H ΔWᵀ) + b over the measured rows, the slopes a_s shared as
    ``slopes`` says (:data:`SLOPES`). Returns ``slopes`` ({key: a}), ``intercept``, ``r2``
    in sample, ``loo_r2`` (each row predicted by a fit on the others), ``n``, ``predicted``
    (the in-sample predictions, per row) and ``r2_ceiling`` = 1 − mean(se²)/var(Δbpb), se
    from each row's 95 % interval: the R² even an exact predictor reaches on average, the
    measurements being this noisy."""
    table = table[np.isfinite(table["delta_bpb"].to_numpy(float))]  # measured rows only
    x, y = table["delta_hessian_err"].to_numpy(float), table["delta_bpb"].to_numpy(float)
    keys = _slope_keys(table, slopes)
    names = list(dict.fromkeys(keys))
    X = _design(x, keys, names)
    beta = np.linalg.lstsq(X, y, rcond=None)[0] if len(y) else np.zeros(X.shape[1])
    pred = X @ beta
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan
    loo_r2 = math.nan
    if len(y) > X.shape[1] and ss_tot > 0:
        loo = np.array([X[i] @ np.linalg.lstsq(X[np.arange(len(y)) != i], y[np.arange(len(y)) != i],
                                               rcond=None)[0] for i in range(len(y))])  # fmt: skip
        loo_r2 = 1.0 - float(((y - loo) ** 2).sum()) / ss_tot
    ceiling = math.nan
    if ss_tot > 0 and {"ci_lo", "ci_hi"} <= set(table.columns):
        se = (table["ci_hi"].to_numpy(float) - table["ci_lo"].to_numpy(float)) / (2 * 1.959964)
        if np.isfinite(se).any():
            ceiling = 1.0 - float(np.nanmean(se**2)) / float(y.var())
    return {"slopes": dict(zip(names, map(float, beta[:-1]), strict=True)), "intercept": float(beta[-1]),
            "r2": r2, "loo_r2": loo_r2, "n": len(y), "r2_ceiling": ceiling, "predicted": pred,
            "kind": slopes}  # fmt: skip


def predict_delta_bpb(table: pd.DataFrame, fit: Mapping[str, Any]) -> np.ndarray:
    """Δbpb of every row of ``table`` (measured or not) by a :func:`fit_predictor` result:
    its slope for the row's key and the shared intercept. A key the fit never saw (a
    group with no measured row under ``slopes="group"``) has no slope: NaN."""
    keys = _slope_keys(table, fit["kind"])
    x = table["delta_hessian_err"].to_numpy(float)
    slope = np.array([fit["slopes"].get(k, math.nan) for k in keys], dtype=float)
    return fit["intercept"] + slope * x


def _changes(policy: Policy, names: list[str], setting: str, shapes: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``setting`` changes any of the group's specs (bits+1 on int8 does not: skipped)."""
    return any(changed_spec(s, setting) != s for s in (policy.spec_for(n, shapes[n]) for n in names))


def _rate(delta_bpb: float, delta_bytes: int) -> float:
    return delta_bpb * 1000.0 / (delta_bytes / 1000.0) if delta_bytes else float("nan")


def _read_rows(out: str | os.PathLike | None, base_bytes: int) -> dict[tuple[str, str], dict]:
    """Rows a killed run already wrote (resume); nothing when ``out`` is absent.

    Rows are kept only if they are a marginal table measured against this same base
    artifact size: rows of another checkpoint, policy or codec are refused, not mixed in."""
    if out is None or not Path(out).is_file():
        return {}
    try:
        df = pd.read_csv(out, dtype={"group": str, "setting": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(
            f"{out}: not a readable marginal table ({exc}); remove it or pick another --out"
        ) from None
    if list(df.columns) != COLUMNS:
        raise ConfigError(
            f"{out}: not a marginal table (columns {list(df.columns)}); remove it or pick another --out"
        )
    numeric = [c for c in COLUMNS if c not in ("group", "setting", "resolved", "kl_resolved")]
    if df[["group", "setting"]].isna().any().any() or any(
        not pd.api.types.is_numeric_dtype(df[c]) for c in numeric
    ):
        raise ConfigError(f"{out}: a row has a missing group/setting or a non-numeric value")
    if len(df) and not (df["base_bytes"] == base_bytes).all():
        raise ConfigError(
            f"{out}: rows measured against a {int(df['base_bytes'].iloc[0]):,}-byte base, this run's base "
            f"is {base_bytes:,} B (another checkpoint, policy or codec); choose another --out"
        )
    return {(r["group"], r["setting"]): r for r in df.to_dict("records")}


# --------------------------------------------------------------------------- allocation

"""The allocator: per-group settings that spend a byte cap where they buy the most bpb.

From a marginal table (:func:`qlab.analysis.marginal.marginal_table`: Δbytes and paired
Δbpb of one change to one group), :func:`choose_settings` picks at most one setting per
group so that Σ Δbpb is smallest with Σ Δbytes within the budget, effects taken as
additive: exhaustively when the table is small (a few groups), else by a Lagrangian
search over each group's lower convex hull — for a multiplier μ every group takes the
option minimising Δbpb + μ·Δbytes, and μ is bisected to the smallest value whose total
fits (optimal among the hull's points; exact when the optimum lies on the hull).
:func:`allocate` then measures the chosen policy for real, paired against the base policy
and against the uniform recipe (the matrices' k solved to the same bytes).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from qlab.analysis.marginal import (
    changed_spec,
    group_tensors,
    measure_policy,
    paired_delta,
    paired_kl,
    scoring_inputs,
)
from qlab.compress.solver import solve_k
from qlab.errors import ConfigError
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import Policy, Rule

__all__ = ["EXHAUSTIVE_MAX", "allocate", "allocated_policy", "allocation_rows", "choose_settings",
           "compare_policies"]  # fmt: skip

#: Above this many combinations :func:`choose_settings` switches from exhaustive search to
#: the Lagrangian one (27 groups × 5 options, a 9-layer layer × family table, is 7·10¹⁸).
EXHAUSTIVE_MAX = 200_000

Option = tuple[str | None, int, float]  # (setting or None = unchanged, Δbytes, Δbpb)


def _options(table: pd.DataFrame, value: str) -> dict[str, list[Option]]:
    if value not in table.columns or not np.isfinite(table[value].to_numpy(float)).all():
        raise ConfigError(f"choose_settings: column {value!r} must hold a finite Δbpb on every row")
    return {g: [(None, 0, 0.0)] + [(r["setting"], int(r["delta_bytes"]), float(r[value]))
                                   for _, r in rows.iterrows()]
            for g, rows in table.groupby("group", sort=False)}  # fmt: skip


def choose_settings(
    table: pd.DataFrame, budget_bytes: int, method: str = "auto", value: str = "delta_bpb"
) -> tuple[dict[str, str], float, int]:
    """The per-group settings (at most one change per group, or none) that minimise the
    Σ Δbpb of the table with Σ Δbytes ≤ ``budget_bytes``; ({group: setting}, Σ Δbpb,
    Σ Δbytes). ``method``: ``"exhaustive"``, ``"lagrangian"`` or ``"auto"`` (exhaustive up
    to :data:`EXHAUSTIVE_MAX` combinations). Unresolved effects count at their point
    estimate. ``value`` names the Δbpb column: the measured ``delta_bpb``, or a predicted
    one (:func:`qlab.analysis.marginal.predict_delta_bpb`) for a table that was not
    evaluated. ConfigError when no combination fits."""
    options = _options(table, value)
    n = math.prod(len(o) for o in options.values())
    if method == "auto":
        method = "exhaustive" if n <= EXHAUSTIVE_MAX else "lagrangian"
    if method == "exhaustive":
        best = _exhaustive(options, budget_bytes)
    elif method == "lagrangian":
        best = _lagrangian(options, budget_bytes)
    else:
        raise ConfigError(f"method must be 'auto', 'exhaustive' or 'lagrangian', got {method!r}")
    if best is None:
        raise ConfigError(
            f"no combination of the table's settings saves the {-budget_bytes:,} bytes asked for"
        )
    picks = {g: c[0] for g, c in best.items() if c[0] is not None}
    return picks, sum(c[2] for c in best.values()), sum(c[1] for c in best.values())


def _exhaustive(options: dict[str, list[Option]], budget: int) -> dict[str, Option] | None:
    best: tuple[float, int, dict[str, Option]] | None = None
    for combo in itertools.product(*options.values()):
        nbytes = sum(c[1] for c in combo)
        bpb = sum(c[2] for c in combo)
        if nbytes <= budget and (best is None or (bpb, nbytes) < best[:2]):
            best = (bpb, nbytes, dict(zip(options, combo, strict=True)))
    return best[2] if best is not None else None


def _pick(options: dict[str, list[Option]], mu: float) -> dict[str, Option]:
    """Each group's option minimising Δbpb + μ·Δbytes (ties: fewer bytes, then unchanged)."""
    return {
        g: min(opts, key=lambda c: (c[2] + mu * c[1], c[1], c[0] is not None)) for g, opts in options.items()
    }


def _lagrangian(options: dict[str, list[Option]], budget: int, iters: int = 200) -> dict[str, Option] | None:
    def total(p: dict[str, Option]) -> int:
        return sum(c[1] for c in p.values())

    free = _pick(options, 0.0)  # bpb alone
    if total(free) <= budget:
        return free
    hi = 1.0
    while total(_pick(options, hi)) > budget:  # μ → ∞ takes each group's fewest bytes
        hi *= 4.0
        if hi > 1e12:
            return None
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if total(_pick(options, mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15 * max(hi, 1.0):
            break
    return _pick(options, hi)


def allocated_policy(
    policy: Policy,
    groups: Mapping[str, list[str]],
    choice: Mapping[str, str],
    shapes: Mapping[str, torch.Tensor],
) -> Policy:
    """``policy`` with each chosen group's setting applied to its tensors."""
    rules = [Rule(name, changed_spec(policy.spec_for(name, shapes[name]), setting))
             for group, setting in choice.items() for name in groups[group]]  # fmt: skip
    label = ",".join(f"{g}:{s}" for g, s in choice.items()) or "base"
    return Policy(f"{policy.name}+{label}", rules + list(policy.rules), policy.default)


def compare_policies(
    model: nn.Module,
    base: Policy,
    other: Policy,
    val_tokens: torch.Tensor,
    byte_tables: Any,
    hessians: Mapping[str, torch.Tensor],
    *,
    seq_len: int,
    codec: str = "ans",
    bos_id: int = 1,
    n_boot: int = 1000,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Real bytes of both artifacts and ``other``'s paired Δbpb and ΔKL (to the float
    model, bits per byte) against ``base``, each with its 95 % interval over documents."""
    ev = scoring_inputs(val_tokens, byte_tables, seq_len, max_tokens, bos_id)
    b = measure_policy(model, base, hessians, ev, codec)
    m = measure_policy(model, other, hessians, ev, codec)
    delta, lo, hi = paired_delta(b.doc_nll, m.doc_nll, ev["doc_bytes"], n_boot)
    dkl, kl_lo, kl_hi = paired_kl(b, m, ev["doc_bytes"], n_boot)
    return {"base_bytes": b.nbytes, "bytes": m.nbytes, "delta_bpb": delta, "ci_lo": lo, "ci_hi": hi,
            "delta_kl": dkl, "kl_lo": kl_lo, "kl_hi": kl_hi}  # fmt: skip


def allocate(
    model: nn.Module,
    policy: Policy,
    table: pd.DataFrame,
    cap: int,
    val_tokens: torch.Tensor,
    byte_tables: Any,
    hessians: Mapping[str, torch.Tensor],
    *,
    seq_len: int,
    grouping: str | Mapping[str, Iterable[str]] = "family",
    codec: str = "ans",
    n_boot: int = 1000,
    max_tokens: int | None = None,
    against_uniform: bool = True,
    value: str = "delta_bpb",
) -> dict[str, Any]:
    """Choose settings for ``cap`` from ``table``, then measure the chosen policy for real:
    paired against the base policy and (``against_uniform``) against the base policy with
    the matrices' k solved (``solve_k``) to the chosen policy's own artifact size — the
    uniform record recipe at equal bytes."""

    choice, pred_bpb, pred_bytes = choose_settings(table, cap - int(table["base_bytes"].iloc[0]), value=value)
    shapes = dict(model.state_dict())
    groups = group_tensors(quantize_model(model, policy, hessians=hessians).quantized_state, grouping)
    chosen = allocated_policy(policy, groups, choice, shapes)
    kw: dict[str, Any] = dict(seq_len=seq_len, codec=codec, n_boot=n_boot, max_tokens=max_tokens)
    out: dict[str, Any] = {
        "choice": choice,
        "policy": chosen,
        "predicted_bpb": pred_bpb,
        "predicted_bytes": pred_bytes,
    }
    if not choice:
        return out
    out["vs_base"] = compare_policies(model, policy, chosen, val_tokens, byte_tables, hessians, **kw)
    if against_uniform:
        weights = {n: t.detach() for n, t in shapes.items()}
        solved = solve_k(weights, policy, out["vs_base"]["bytes"], hessians=hessians, codec=codec)
        out["uniform_k"] = solved.k
        out["vs_uniform"] = compare_policies(
            model, solved.policy, chosen, val_tokens, byte_tables, hessians, **kw
        )
    return out


def allocation_rows(result: Mapping[str, Any]) -> pd.DataFrame:
    """:func:`allocate`'s measured comparisons as rows: ``comparison`` ("vs base policy",
    "vs uniform k at equal bytes"), ``choice``, ``bytes`` (the chosen policy's artifact),
    ``other_bytes``, ``delta_bpb`` (chosen − other, paired), ``ci_lo``, ``ci_hi``,
    ``resolved`` (the interval excludes 0), ``predicted_bpb`` (the table's additive
    prediction against the base), ``uniform_k``, and the same comparison on the quiet
    signal: ``delta_kl`` (KL to the float model, chosen − other, bits per byte) with
    ``kl_lo``/``kl_hi`` and ``kl_resolved``. Empty when nothing was chosen."""
    columns = ["comparison", "choice", "bytes", "other_bytes", "delta_bpb", "ci_lo", "ci_hi", "resolved",
               "predicted_bpb", "uniform_k", "delta_kl", "kl_lo", "kl_hi", "kl_resolved"]  # fmt: skip
    choice = ", ".join(f"{g} {s}" for g, s in result.get("choice", {}).items())
    rows = []
    for key, label in (("vs_base", "vs base policy"), ("vs_uniform", "vs uniform k at equal bytes")):
        if key not in result:
            continue
        c = result[key]
        rows.append({
            "comparison": label, "choice": choice, "bytes": int(c["bytes"]),
            "other_bytes": int(c["base_bytes"]), "delta_bpb": c["delta_bpb"],
            "ci_lo": c["ci_lo"], "ci_hi": c["ci_hi"],
            "resolved": bool(c["ci_lo"] > 0 or c["ci_hi"] < 0), "predicted_bpb": result["predicted_bpb"],
            "uniform_k": result.get("uniform_k", float("nan")),
            "delta_kl": c["delta_kl"], "kl_lo": c["kl_lo"], "kl_hi": c["kl_hi"],
            "kl_resolved": bool(c["kl_lo"] > 0 or c["kl_hi"] < 0),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=columns)

"""PR #2011 (cross-base regularizers × quantization): its pipeline, geometry and depth tables."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from qlab.analysis.papers._files import _json, _mapping, _num
from qlab.errors import DataError
from qlab.eval.stages import ATTRIBUTION_COLUMNS, STAGES, attribute_stages

REGULARIZERS = ("QAHSP", "ES", "AOS", "HSU", "WBC", "WOP", "PCS", "SimCTG")
_RENAME_ISO = {"isoscore": "mean_abs_cos", "isoscore_post": "mean_abs_cos_post"}


# ---------------------------------------------------------------- PR #2011 cell names
_LAMBDA = re.compile(r"λ\s*=\s*([0-9.]+)")


def parse_cell(name: str, pair_lambdas: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """Split a PR #2011 cell name into ``base``, ``regs`` ("+"-joined), ``lambda``, ``lambdas``.

    "QAHSP λ=0.3" → A / QAHSP / 0.3; "PQT + ES λ=0.05" → A-PQT / ES; "Base B + ES λ=0.05"
    and "B + ES λ=0.05" → B / ES; "Base B baseline (PR #1965)" → B / "" ; "QAHSP+HSU pair"
    → A / QAHSP+HSU with per-reg λ from ``pair_lambdas``; "B + bigram 1024×8" → B / bigram.
    """
    text = name.strip()
    base = "A"
    for prefix, b in (("Base B + ", "B"), ("Base B ", "B"), ("B + ", "B"), ("PQT + ", "A-PQT")):
        if text.startswith(prefix):
            text, base = text[len(prefix) :], b
            break
    m = _LAMBDA.search(text)
    lam = float(m.group(1)) if m else math.nan
    head = text[: m.start()] if m else text
    regs = head.split()[0].split("(")[0] if head.split() else ""
    if regs == "baseline":
        regs = ""
    per_reg = dict((pair_lambdas or {}).get(name, {}))
    if not per_reg and regs and m:
        per_reg = {regs: lam}
    lambdas = ",".join(f"{k}={v:g}" for k, v in per_reg.items())
    return {"base": base, "regs": regs, "lambda": lam, "lambdas": lambdas}


def _transcribed(root: str | Path | None) -> Mapping:
    data = _mapping(
        _json(root, "pr2011", "transcribed.json"), ["baselines", "pair_lambdas"], "transcribed.json"
    )
    pairs = {k: v for k, v in data["pair_lambdas"].items() if k != "source"}
    for cell, lams in pairs.items():
        for reg, lam in _mapping(lams, [], f"transcribed.json pair_lambdas[{cell!r}]").items():
            _num(lam, f"transcribed.json pair_lambdas[{cell!r}][{reg!r}]")
    return {"baselines": data["baselines"], "pair_lambdas": pairs}


# ---------------------------------------------------------------- PR #2011 pipeline tables
_ATTR_KEYS: tuple[str, ...] = ("cell", "base", "pre_quant", "quantized", "sliding", "ttt", "quant_cost_mBPB")
_ATTR_KEYS += ("sliding_gain_mBPB", "ttt_gain_mBPB", "final")
_WIDE_COLUMNS = ["source", "base", "variant", "regs", "lambda", "lambdas", *ATTRIBUTION_COLUMNS]


def eval_pipeline_breakdown(root: str | Path | None = None) -> pd.DataFrame:
    """PR #2011 ``eval_pipeline_breakdown.json``: one row per (cell, logged stage).

    Columns: source, variant, base, regs, lambda, lambdas, size_bytes, stage, bpb.
    """
    data = _mapping(
        _json(root, "pr2011", "eval_pipeline_breakdown.json"), ["cells"], "eval_pipeline_breakdown.json"
    )
    pairs = _transcribed(root)["pair_lambdas"]
    rows = []
    for i, cell in enumerate(data["cells"]):
        where = f"eval_pipeline_breakdown.json cells[{i}]"
        cell = _mapping(cell, ["name", "size", "metrics"], where)
        meta = parse_cell(cell["name"], pairs)
        for stage, bpb in _mapping(cell["metrics"], [], f"{where}.metrics").items():
            if stage not in STAGES:
                raise DataError(f"{where}: unknown stage {stage!r}; expected one of {list(STAGES)}")
            rows.append(
                {
                    "source": "paper:pr2011",
                    "variant": cell["name"],
                    **meta,
                    "size_bytes": int(_num(cell["size"], f"{where}.size")),
                    "stage": stage,
                    "bpb": _num(bpb, f"{where}.metrics[{stage!r}]"),
                }
            )
    return pd.DataFrame(rows)


def pipeline_attribution(root: str | Path | None = None) -> pd.DataFrame:
    """PR #2011 ``pipeline_attribution.json`` with qlab's column names, one row per cell.

    ``quant_tax_mbpb`` is the paper's ``quant_cost_mBPB`` = quantized − pre-quant, which
    for the PreQuantTTT cells skips the TTT stage in between (so it comes out negative);
    ``prequant_ttt_bpb`` is filled from ``eval_pipeline_breakdown.json`` to show that
    stage, and :func:`stage_attribution` measures the tax from it instead.
    """
    data = _json(root, "pr2011", "pipeline_attribution.json")
    if not isinstance(data, list) or not data:
        raise DataError("pipeline_attribution.json: expected a non-empty list of cells")
    pairs = _transcribed(root)["pair_lambdas"]
    breakdown = eval_pipeline_breakdown(root)
    pqt = breakdown[breakdown["stage"] == "post-prequant-ttt"].set_index("variant")["bpb"]
    rows = []
    for i, rec in enumerate(data):
        where = f"pipeline_attribution.json[{i}]"
        rec = _mapping(rec, _ATTR_KEYS, where)
        meta = parse_cell(rec["cell"], pairs)
        if meta["base"] != rec["base"]:
            raise DataError(f"{where}: base {rec['base']!r} disagrees with cell name {rec['cell']!r}")

        def num(key: str, where: str = where, rec: Mapping = rec) -> float:
            return _num(rec[key], f"{where}.{key}", optional=True)

        rows.append(
            {
                "source": "paper:pr2011",
                **meta,
                "base": rec["base"],
                "variant": rec["cell"],
                "pre_quant_bpb": num("pre_quant"),
                "prequant_ttt_bpb": float(pqt.get(rec["cell"], math.nan)),
                "quantized_bpb": num("quantized"),
                "sliding_bpb": num("sliding"),
                "ttt_bpb": num("ttt"),
                "quant_tax_mbpb": num("quant_cost_mBPB"),
                "sliding_gain_mbpb": num("sliding_gain_mBPB"),
                "ttt_gain_mbpb": num("ttt_gain_mBPB"),
                "final_bpb": num("final"),
            }
        )
    return pd.DataFrame(rows, columns=_WIDE_COLUMNS)


def stage_attribution(long: pd.DataFrame) -> pd.DataFrame:
    """Stage-long rows (variant, stage, bpb, …) → one wide row per variant (qlab or paper).

    quant tax = quantized − last float stage (pre-quant TTT if run, else pre-quant);
    sliding gain = sliding − quantized; TTT gain = TTT − (sliding if run, else
    quantized); final = the last stage run. Differences in mBPB.
    """
    need = ["variant", "stage", "bpb"]
    missing = [c for c in need if c not in long.columns]
    if missing:
        raise DataError(f"stage table lacks column(s) {missing}")
    unknown = sorted(set(long["stage"]) - set(STAGES))
    if unknown:
        raise DataError(f"unknown stage(s) {unknown}; expected names from {list(STAGES)}")
    keys = [c for c in ("source", "base", "variant", "regs", "lambda", "lambdas") if c in long.columns]
    rows = []
    for _, g in long.groupby("variant", sort=False):
        by = dict(zip(g["stage"], g["bpb"].astype(float)))
        row = {k: g[k].iloc[0] for k in keys}
        row |= attribute_stages(by)
        rows.append(row)
    computed = set(attribute_stages({}))
    return pd.DataFrame(rows).reindex(columns=[c for c in _WIDE_COLUMNS if c in keys or c in computed])


def pr2011_baselines(root: str | Path | None = None) -> dict[str, float]:
    """Final bpb of each base without an extra regularizer: A and A-PQT (transcribed from
    the paper's figures), B (the "Base B baseline" cell of the breakdown)."""
    base = {
        k: _num(_mapping(v, ["final_bpb"], f"baselines[{k}]")["final_bpb"], f"baselines[{k}]")
        for k, v in _transcribed(root)["baselines"].items()
    }
    wide = stage_attribution(eval_pipeline_breakdown(root))
    b = wide[(wide["base"] == "B") & (wide["regs"] == "")]
    if len(b) != 1:
        raise DataError(f"eval_pipeline_breakdown.json: expected one 'Base B baseline' cell, found {len(b)}")
    base["B"] = float(b["final_bpb"].iloc[0])
    return base


def with_deltas(wide: pd.DataFrame, baselines: Mapping[str, float], value: str = "final_bpb") -> pd.DataFrame:
    """Add ``baseline_bpb`` (by ``base``) and ``delta_mbpb`` = 1000·(value − baseline)."""
    for col in ("base", value):
        if col not in wide.columns:
            raise DataError(f"with_deltas: table lacks column {col!r}")
    absent = sorted(set(wide["base"]) - set(baselines))
    if absent:
        raise DataError(f"with_deltas: no baseline for base(s) {absent}; have {sorted(baselines)}")
    out = wide.copy()
    out["baseline_bpb"] = out["base"].map(baselines).astype(float)
    out["delta_mbpb"] = 1e3 * (out[value].astype(float) - out["baseline_bpb"])
    return out


def reg_deltas(root: str | Path | None = None) -> pd.DataFrame:
    """Every PR #2011 cell (breakdown) with its Δ final bpb vs its base's baseline, in mBPB."""
    return with_deltas(stage_attribution(eval_pipeline_breakdown(root)), pr2011_baselines(root))


# ---------------------------------------------------------------- PR #2011 geometry tables
def reg_quant_matrix(root: str | Path | None = None) -> pd.DataFrame:
    """``real_reg_quant_matrix.json``: one row per (variant, scheme) with l2_distortion,
    cos_shift, mean_abs_cos_post (the JSON's isoscore_post) and eff_rank_post."""
    keys = ("l2_distortion", "cos_shift", "isoscore_post", "eff_rank_post")
    data = _mapping(_json(root, "pr2011", "real_reg_quant_matrix.json"), [], "real_reg_quant_matrix.json")
    rows = []
    for variant, schemes in data.items():
        for scheme, m in _mapping(schemes, [], f"real_reg_quant_matrix.json[{variant!r}]").items():
            where = f"real_reg_quant_matrix.json[{variant!r}][{scheme!r}]"
            m = _mapping(m, keys, where)
            rows.append(
                {"source": "paper:pr2011", "variant": variant, "scheme": scheme}
                | {_RENAME_ISO.get(k, k): _num(m[k], f"{where}.{k}") for k in keys}
            )
    return pd.DataFrame(rows)


def canonical_metrics(root: str | Path | None = None) -> pd.DataFrame:
    """``real_canonical_metrics.json``: one row per variant (mean_abs_cos, eff_rank,
    norm_var, norm_mean, max_abs) of 128 × 512 final hidden states."""
    keys = ("isoscore", "eff_rank", "norm_var", "norm_mean", "max_abs")
    data = _mapping(_json(root, "pr2011", "real_canonical_metrics.json"), [], "real_canonical_metrics.json")
    rows = []
    for variant, m in data.items():
        where = f"real_canonical_metrics.json[{variant!r}]"
        m = _mapping(m, keys, where)
        rows.append(
            {"source": "paper:pr2011", "variant": variant}
            | {_RENAME_ISO.get(k, k): _num(m[k], f"{where}.{k}") for k in keys}
        )
    return pd.DataFrame(rows)


def cka_pairwise(root: str | Path | None = None) -> pd.DataFrame:
    """``cka_pairwise.json`` as long rows (source, variant_a, variant_b, cka); checks symmetry."""
    data = _mapping(_json(root, "pr2011", "cka_pairwise.json"), [], "cka_pairwise.json")
    names = list(data)
    rows = []
    for a in names:
        row = _mapping(data[a], names, f"cka_pairwise.json[{a!r}]")
        for b in names:
            v = _num(row[b], f"cka_pairwise.json[{a!r}][{b!r}]")
            if abs(v - _num(data[b][a], f"cka_pairwise.json[{b!r}][{a!r}]")) > 1e-6:
                raise DataError(f"cka_pairwise.json: CKA({a},{b}) ≠ CKA({b},{a})")
            rows.append({"source": "paper:pr2011", "variant_a": a, "variant_b": b, "cka": v})
    return pd.DataFrame(rows)


def depth_trajectory(root: str | Path | None = None) -> pd.DataFrame:
    """``depth_trajectory.json``: one row per (variant, block) with mean_norm and kurtosis
    (mean per-token excess kurtosis); ``block`` is 0-based."""
    data = _mapping(_json(root, "pr2011", "depth_trajectory.json"), [], "depth_trajectory.json")
    rows = []
    for variant, d in data.items():
        where = f"depth_trajectory.json[{variant!r}]"
        d = _mapping(d, ["norms", "kurts"], where)
        if not isinstance(d["norms"], list) or len(d["norms"]) != len(d["kurts"]) or not d["norms"]:
            raise DataError(f"{where}: 'norms' and 'kurts' must be equal-length non-empty lists")
        for i, (n, k) in enumerate(zip(d["norms"], d["kurts"])):
            rows.append(
                {
                    "source": "paper:pr2011",
                    "variant": variant,
                    "block": i,
                    "mean_norm": _num(n, f"{where}.norms[{i}]"),
                    "kurtosis": _num(k, f"{where}.kurts[{i}]"),
                }
            )
    return pd.DataFrame(rows)

"""The papers' own published numbers as tidy DataFrames, in qlab's measurement schema.

The data ship with the package under ``qlab/resources/papers/<pr>/``: PR #2011's JSON
tables and PR #1394's logs + ``submission.json`` verbatim, plus small CSV/JSON files
transcribed from the PR texts (each row cites its source). Every loader takes an
optional ``root`` (a directory laid out like ``resources/papers``) so tests and users
can point it at other copies; missing files, missing keys and non-finite numbers raise
:class:`~qlab.errors.DataError` naming the file and field.

Schema notes (so paper rows and qlab rows can share one DataFrame):

* ``source`` is ``"paper:pr<N>"`` here and ``"qlab"`` for qlab's own measurements.
* ``variant`` is the cell/model name; ``stage`` uses the names records log
  (:data:`STAGES`); bpb columns end in ``_bpb``, milli-bpb differences in ``_mbpb``.
* PR #2011 stores the mean |cos(hᵢ, hⱼ)| anisotropy under the key ``isoscore``; qlab
  calls that quantity ``mean_abs_cos`` (``isoscore`` is the Rudman IsoScore there, see
  :mod:`qlab.analysis.geometry`), so the loaders rename ``isoscore`` →
  ``mean_abs_cos`` and ``isoscore_post`` → ``mean_abs_cos_post``.
* Depth blocks are 0-based like ``blocks.{i}`` (the paper's figure counts from 1).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qlab.errors import DataError
from qlab.eval.stages import STAGE_LABELS, STAGES, attribute_stages

__all__ = [
    "REGULARIZERS",
    "STAGES",
    "STAGE_LABELS",
    "papers_dir",
    "parse_cell",
    "pipeline_attribution",
    "eval_pipeline_breakdown",
    "stage_attribution",
    "with_deltas",
    "pr2011_baselines",
    "reg_deltas",
    "reg_quant_matrix",
    "canonical_metrics",
    "cka_pairwise",
    "depth_trajectory",
    "pr1394_seeds",
    "pr1394_published_table",
    "pr1394_train_curve",
    "pr1818_seeds",
    "pr1818_summary",
    "pr1818_baseline_bpb",
    "pr1718_levers",
    "pr639_results",
]

REGULARIZERS = ("QAHSP", "ES", "AOS", "HSU", "WBC", "WOP", "PCS", "SimCTG")
_RENAME_ISO = {"isoscore": "mean_abs_cos", "isoscore_post": "mean_abs_cos_post"}


# ---------------------------------------------------------------- file access helpers
def papers_dir(root: str | Path | None = None) -> Path:
    """Directory holding ``pr<N>/`` folders (default: the copy shipped with qlab)."""
    path = Path(root) if root is not None else Path(__file__).resolve().parent.parent / "resources" / "papers"
    if not path.is_dir():
        raise DataError(f"paper data directory {path} does not exist")
    return path


def _file(root: str | Path | None, pr: str, name: str) -> Path:
    path = papers_dir(root) / pr / name
    if not path.is_file():
        raise DataError(f"paper data file {path} is missing")
    return path


def _json(root: str | Path | None, pr: str, name: str) -> Any:
    path = _file(root, pr, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


def _csv(root: str | Path | None, pr: str, name: str, columns: Iterable[str]) -> pd.DataFrame:
    path = _file(root, pr, name)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV: {exc}") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; has {list(df.columns)}")
    return df


def _mapping(obj: Any, keys: Iterable[str], where: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    return obj


def _num(value: Any, where: str, *, optional: bool = False) -> float:
    """A finite float (``None``/empty → NaN when ``optional``)."""
    if optional and (value is None or value == ""):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: expected a finite number, got {value!r}")
    return x


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
_ATTR_KEYS = ("cell", "base", "pre_quant", "quantized", "sliding", "ttt", "quant_cost_mBPB")
_ATTR_KEYS += ("sliding_gain_mBPB", "ttt_gain_mBPB", "final")
_WIDE_COLUMNS = [
    "source",
    "base",
    "variant",
    "regs",
    "lambda",
    "lambdas",
    "pre_quant_bpb",
    "prequant_ttt_bpb",
    "quantized_bpb",
    "sliding_bpb",
    "ttt_bpb",
    "quant_tax_mbpb",
    "sliding_gain_mbpb",
    "ttt_gain_mbpb",
    "final_bpb",
]


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


# ---------------------------------------------------------------- PR #1394 logs
_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"
_STAGE_LINE = {
    "pre_quant": re.compile(rf"^pre-quantization post-ema val_loss:{_FLOAT} val_bpb:{_FLOAT}", re.M),
    "quantized": re.compile(rf"^quantized val_loss:{_FLOAT} val_bpb:{_FLOAT}", re.M),
    "sliding": re.compile(rf"^quantized_sliding_window val_loss:{_FLOAT} val_bpb:{_FLOAT}", re.M),
}
_INTS = {
    "seed_hp": re.compile(r"^\s*seed: (\d+)\s*$", re.M),
    "stop": re.compile(r"^stopping_early: \w+ train_time: (\d+)ms step: (\d+)/\d+", re.M),
    "artifact_bytes": re.compile(r"^Total submission size quantized\+brotli: (\d+) bytes", re.M),
    "model_bytes": re.compile(r"^Serialized model quantized\+brotli: (\d+) bytes", re.M),
    "code_bytes": re.compile(r"^Code size: (\d+) bytes", re.M),
    "loop_enabled_step": re.compile(r"^layer_loop:enabled step:(\d+)", re.M),
}
_TRAIN_LINE = re.compile(rf"^(\d+)/\d+ train_loss: {_FLOAT} train_time: {_FLOAT}m tok/s: (\d+)", re.M)
_VAL_LINE = re.compile(rf"^(\d+)/\d+ val_loss: {_FLOAT} val_bpb: {_FLOAT}\s*$", re.M)


def _logs(root: str | Path | None) -> dict[int, tuple[Path, str]]:
    folder = papers_dir(root) / "pr1394"
    found = {}
    for path in sorted(folder.glob("train_seed*.log")):
        m = re.fullmatch(r"train_seed(\d+)\.log", path.name)
        if m:
            found[int(m.group(1))] = (path, path.read_text(encoding="utf-8", errors="replace"))
    if not found:
        raise DataError(f"no train_seed*.log files in {folder}")
    return found


def _one(regex: re.Pattern, text: str, path: Path, what: str) -> re.Match:
    hits = list(regex.finditer(text))
    if len(hits) != 1:
        raise DataError(f"{path}: expected exactly one {what} line, found {len(hits)} (truncated log?)")
    return hits[0]


def _parse_log(seed: int, path: Path, text: str) -> dict:
    row: dict[str, Any] = {"source": "paper:pr1394", "seed": seed}
    if int(_one(_INTS["seed_hp"], text, path, "'seed:' hyperparameter").group(1)) != seed:
        raise DataError(f"{path}: the logged seed disagrees with the file name")
    stop = _one(_INTS["stop"], text, path, "stopping_early")
    row["steps"], row["train_time_ms"] = int(stop.group(2)), int(stop.group(1))
    row["loop_enabled_step"] = int(
        _one(_INTS["loop_enabled_step"], text, path, "layer_loop:enabled").group(1)
    )
    for key, regex in _STAGE_LINE.items():
        m = _one(regex, text, path, f"{key} stage")
        row[f"{key}_loss"], row[f"{key}_bpb"] = float(m.group(1)), float(m.group(2))
    for key in ("model_bytes", "code_bytes", "artifact_bytes"):
        row[key] = int(_one(_INTS[key], text, path, key).group(1))
    if row["model_bytes"] + row["code_bytes"] != row["artifact_bytes"]:
        raise DataError(f"{path}: model + code bytes ≠ total submission bytes")
    row["quant_tax_mbpb"] = 1e3 * (row["quantized_bpb"] - row["pre_quant_bpb"])
    row["sliding_gain_mbpb"] = 1e3 * (row["sliding_bpb"] - row["quantized_bpb"])
    row["final_bpb"] = row["sliding_bpb"]
    return row


def pr1394_seeds(root: str | Path | None = None) -> pd.DataFrame:
    """One row per seed parsed from PR #1394's logs, cross-checked against submission.json.

    Columns: source, seed, steps, train_time_ms, loop_enabled_step, {pre_quant, quantized,
    sliding}_{loss,bpb}, model_bytes, code_bytes, artifact_bytes, quant_tax_mbpb,
    sliding_gain_mbpb, final_bpb.
    """
    sub = _mapping(_json(root, "pr1394", "submission.json"), ["seed_results", "val_bpb"], "submission.json")
    rows = [_parse_log(seed, path, text) for seed, (path, text) in _logs(root).items()]
    for row in rows:
        where = f"submission.json seed_results[{row['seed']}]"
        ref = _mapping(
            _mapping(sub["seed_results"], [str(row["seed"])], "submission.json seed_results")[
                str(row["seed"])
            ],
            ["val_bpb", "artifact_bytes", "steps"],
            where,
        )
        if int(ref["steps"]) != row["steps"] or int(ref["artifact_bytes"]) != row["artifact_bytes"]:
            raise DataError(f"{where}: steps/artifact_bytes disagree with train_seed{row['seed']}.log")
        if abs(_num(ref["val_bpb"], where) - row["sliding_bpb"]) > 5.1e-6:
            raise DataError(f"{where}: val_bpb disagrees with the log's sliding-window bpb")
    return pd.DataFrame(rows).sort_values("seed", ignore_index=True)


def pr1394_published_table(root: str | Path | None = None) -> pd.DataFrame:
    """PR #1394's per-seed table as printed in the PR (5-decimal bpb), incl. the mean row."""
    cols = ["seed", "steps", "pre_quant_bpb", "quantized_bpb", "sliding_bpb", "artifact_bytes", "source"]
    df = _csv(root, "pr1394", "seed_table.csv", cols)
    out = pd.DataFrame({"seed": df["seed"], "source_ref": df["source"]})
    for c in cols[1:-1]:
        out[c] = [_num(v, f"pr1394/seed_table.csv {c}", optional=True) for v in df[c]]
    for c in ("steps", "artifact_bytes"):
        out[c] = out[c].round().astype("Int64")
    return out


def pr1394_train_curve(root: str | Path | None = None) -> pd.DataFrame:
    """Training curve rows (source, seed, step, train_loss, val_loss, val_bpb, elapsed_s,
    tok_per_s); loss in nats/token. ``elapsed_s`` has the log's 0.1-min resolution
    except at step 0 (0) and at the last step (the exact ``stopping_early`` time)."""
    frames = []
    for seed, (path, text) in _logs(root).items():
        train = pd.DataFrame(
            [(int(m[0]), float(m[1]), 60.0 * float(m[2]), float(m[3])) for m in _TRAIN_LINE.findall(text)],
            columns=["step", "train_loss", "elapsed_s", "tok_per_s"],
        )
        val = pd.DataFrame(
            [(int(m[0]), float(m[1]), float(m[2])) for m in _VAL_LINE.findall(text)],
            columns=["step", "val_loss", "val_bpb"],
        )
        if train.empty or val.empty:
            raise DataError(f"{path}: no train_loss/val_bpb lines found")
        df = train.merge(val, on="step", how="outer").sort_values("step", ignore_index=True)
        stop = _one(_INTS["stop"], text, path, "stopping_early")
        df.loc[df["step"] == 0, "elapsed_s"] = 0.0
        df.loc[df["step"] == int(stop.group(2)), "elapsed_s"] = int(stop.group(1)) / 1e3
        df.insert(0, "seed", seed)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True).sort_values(["seed", "step"], ignore_index=True)
    out.insert(0, "source", "paper:pr1394")
    return out[["source", "seed", "step", "train_loss", "val_loss", "val_bpb", "elapsed_s", "tok_per_s"]]


# ---------------------------------------------------------------- PR #1818, #1718, #639 tables
_PR1818_STAGES = {"pre-quant": STAGES[0], "post-quant": "quantized", "post-TTT": "legal_ttt"}


def _pr1818_table(root: str | Path | None) -> pd.DataFrame:
    df = _csv(root, "pr1818", "seed_table.csv", ["row", "mean", "sigma", "source"])
    if [r for r in df["row"]] != [*_PR1818_STAGES, "artifact bytes"]:
        raise DataError(f"pr1818/seed_table.csv rows {list(df['row'])} are not the PR's four rows")
    return df.set_index("row")


def pr1818_seeds(root: str | Path | None = None) -> pd.DataFrame:
    """PR #1818's per-seed stage table: one row per (seed, stage) with bpb and the seed's
    artifact bytes. Stages: pre-quant, quantized, and ``legal_ttt`` (its sliding TTT)."""
    df = _pr1818_table(root)
    seeds = [c for c in df.columns if c.startswith("seed ")]
    if not seeds:
        raise DataError("pr1818/seed_table.csv has no 'seed N' columns")
    rows = []
    for col in seeds:
        size = int(_num(df.loc["artifact bytes", col], f"pr1818/seed_table.csv {col} artifact bytes"))
        for label, stage in _PR1818_STAGES.items():
            rows.append(
                {
                    "source": "paper:pr1818",
                    "seed": int(col.split()[1]),
                    "stage": stage,
                    "bpb": _num(df.loc[label, col], f"pr1818/seed_table.csv {col} {label}"),
                    "artifact_bytes": size,
                }
            )
    return pd.DataFrame(rows)


def pr1818_summary(root: str | Path | None = None) -> pd.DataFrame:
    """The mean and σ columns PR #1818 printed (stage, mean_bpb, sigma_bpb)."""
    df = _pr1818_table(root)
    return pd.DataFrame(
        [
            {
                "stage": stage,
                "mean_bpb": _num(df.loc[label, "mean"], f"pr1818 {label} mean"),
                "sigma_bpb": _num(df.loc[label, "sigma"], f"pr1818 {label} sigma"),
            }
            for label, stage in _PR1818_STAGES.items()
        ]
    )


def pr1818_baseline_bpb(root: str | Path | None = None) -> float:
    """The naive-baseline bpb line PR #1818's figures draw (1.2244)."""
    df = _csv(root, "pr1818", "constants.csv", ["name", "value"]).set_index("name")
    if "naive_baseline_bpb" not in df.index:
        raise DataError("pr1818/constants.csv lacks naive_baseline_bpb")
    return _num(df.loc["naive_baseline_bpb", "value"], "pr1818/constants.csv naive_baseline_bpb")


def pr1718_levers(root: str | Path | None = None) -> pd.DataFrame:
    """PR #1718's eval-time lever table, one row per (lever, measured stage); ``delta_bpb``
    and ``value_bpb`` are NaN where the PR gives no number."""
    cols = ["lever", "stage", "delta_bpb", "value_bpb", "result", "verdict", "source"]
    df = _csv(root, "pr1718", "levers.csv", cols)
    bad = sorted(set(df["stage"]) - set(STAGES) - {""})
    if bad:
        raise DataError(f"pr1718/levers.csv: unknown stage(s) {bad}")
    for c in ("delta_bpb", "value_bpb"):
        df[c] = [_num(v, f"pr1718/levers.csv {c}", optional=True) for v in df[c]]
    df["stage"] = df["stage"].replace("", np.nan)
    df.insert(0, "paper", "paper:pr1718")
    return df.rename(columns={"source": "source_ref", "paper": "source"})


def pr639_results(root: str | Path | None = None) -> pd.DataFrame:
    """PR #639's GPTQ/TTT numbers (setting, metric, value, unit, note, source_ref)."""
    df = _csv(root, "pr639", "results.csv", ["setting", "metric", "value", "unit", "note", "source"])
    df["value"] = [_num(v, f"pr639/results.csv value of {s!r}") for v, s in zip(df["value"], df["setting"])]
    df.insert(0, "paper", "paper:pr639")
    return df.rename(columns={"source": "source_ref", "paper": "source"})

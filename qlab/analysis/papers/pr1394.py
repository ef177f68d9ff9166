"""PR #1394 (SDClip, GPTQ embeddings, looped layers): its seed logs and published table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from qlab.analysis.papers._files import _csv, _json, _mapping, _num, papers_dir
from qlab.errors import DataError

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

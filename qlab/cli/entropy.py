"""``qlab entropy CKPT``: per-tensor entropies and predicted brotli-11 bytes vs the 16 MB cap."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from qlab.analysis.entropy_report import DEFAULT_CODECS, EntropyReport, entropy_report
from qlab.analysis.rd import tensor_family
from qlab.cli._args import plain
from qlab.compress.predict import RECORD_CODEC
from qlab.errors import ConfigError
from qlab.eval.context import EvalContext
from qlab.io.atomic import check_output
from qlab.progress import cli_progress
from qlab.quant.policy import resolve_policy

HELP = "entropy and predicted compressed size of a checkpoint"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("entropy", help=HELP, description=plain(__doc__))
    p.add_argument("ckpt", metavar="CKPT", help="run dir, .safetensors, HF dir, .pt, .ptz or .qlab")
    p.add_argument("--policy", default="record", help="quantization policy preset (default: record)")
    p.add_argument("--measure", action="store_true", help="also compress for real with each codec")
    p.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="codecs for --measure (comma list)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--csv", metavar="OUT", help="write the per-tensor table as CSV")
    p.add_argument("--code-bytes", type=int, default=0, metavar="N", help="bytes of the submission's code")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--calib-data",
        metavar="DATA",
        help="dataset for a cheap GPTQ pass (exact GPTQ codes instead of RTN + correction)",
    )
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches for --calib-data")
    p.add_argument("--force", action="store_true", help="replace existing --json/--csv outputs")
    p.add_argument("--top", type=int, metavar="N", help="list only the N largest tensors (the rest summed)")
    p.add_argument(
        "--sort", choices=SORT_KEYS, default="storage", help="table order (default: storage order)"
    )
    p.add_argument(
        "--by-family", action="store_true", help="one row per weight family (embedding, attention, mlp, ...)"
    )
    p.set_defaults(func=run)


SORT_KEYS = ("storage", "name", "predicted", "h0", "bits_per_param")


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as the cap is)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ordered(t: pd.DataFrame, sort: str, top: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to list, rows left out) under ``--sort`` and ``--top``."""
    if sort != "storage":
        key = {"predicted": "predicted_bytes"}.get(sort, sort)
        t = t.sort_values(key, ascending=sort == "name", kind="stable")
    if top is None or top >= len(t):
        return t, t.iloc[:0]
    largest = t.nlargest(top, "predicted_bytes").index
    return t.loc[t.index.isin(largest)], t.loc[~t.index.isin(largest)]


def family_table(report: EntropyReport) -> pd.DataFrame:
    """One row per weight family: tensors, parameters, predicted bytes, share, bits/param."""

    t = report.table.assign(family=report.table["name"].map(tensor_family))
    g = t.groupby("family", sort=False).agg(
        tensors=("name", "size"), numel=("numel", "sum"), predicted_bytes=("predicted_bytes", "sum")
    )
    g["share"] = g["predicted_bytes"] / g["predicted_bytes"].sum()
    g["bits_per_param"] = 8 * g["predicted_bytes"] / g["numel"]
    return g.sort_values("predicted_bytes", ascending=False).reset_index()


def format_family_table(report: EntropyReport) -> str:
    g = family_table(report)
    return pd.DataFrame(
        {
            "family": g["family"],
            "tensors": g["tensors"],
            "params": g["numel"].map("{:,}".format),
            "predicted": g["predicted_bytes"].map(human_bytes),
            "share": g["share"].map("{:.1%}".format),
            "bits/param": g["bits_per_param"].map("{:.3f}".format),
        }
    ).to_string(index=False)


def method_counts(report: EntropyReport) -> str:
    """``gptq 28, passthrough:fp16 15``: how many tensors each storage method took."""
    counts = report.table["method"].value_counts()
    return ", ".join(f"{m} {n}" for m, n in counts.items())


def format_table(report: EntropyReport, sort: str = "storage", top: int | None = None) -> str:
    """The per-tensor table as aligned text with human-readable sizes."""
    t, rest = _ordered(report.table, sort, top)
    out = pd.DataFrame(
        {
            "tensor": t["name"],
            "shape": t["shape"],
            "method": t["method"],
            "bits": t["bits"],
            "k": t["k"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
            "H0": t["h0"].map("{:.3f}".format),
            "H_row": t["h_row"].map("{:.3f}".format),
            "H1": t["h1"].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}"),
            "scales": t["scale_bytes"].map(human_bytes),
            "predicted": t["predicted_bytes"].map(human_bytes),
            "bits/param": t["bits_per_param"].map("{:.3f}".format),
        }
    )
    col = f"real_bytes[{RECORD_CODEC}]"
    if col in t:
        out["real"] = t[col].map(human_bytes)
        out["error"] = t["prediction_error"].map(lambda v: "-" if pd.isna(v) else f"{100 * v:+.2f}%")
    text = out.to_string(index=False)
    if len(rest):
        text += f"\n... {len(rest)} more tensors: {human_bytes(rest['predicted_bytes'].sum())} predicted"
    return text


def format_totals(report: EntropyReport) -> str:
    """Totals against the cap, one line each."""
    s = report.totals
    room = s["cap_bytes"] - s.get("corrected_total_bytes", s["predicted_total_bytes"])
    verdict = {
        "fits": f"fits, {room:,} bytes to spare",
        "over": f"OVER by {-room:,}",
        "undecided": f"UNDECIDED: {room:+,} bytes of headroom is inside the GPTQ correction's ±2 sd",
    }[s.get("verdict", "fits" if s["fits"] else "over")]
    lines = [
        f"tensors {s['tensors']}, parameters {s['numel']:,}, policy {s['policy']}",
        f"predicted {RECORD_CODEC}: {s['predicted_bytes']:,} bytes ({human_bytes(s['predicted_bytes'])}, "
        f"{s['bits_per_param']:.3f} bits/param; skeleton {s['skeleton_bytes']:,})",
        f"+ code {s['code_bytes']:,} = {s['predicted_total_bytes']:,} of the {s['cap_bytes']:,}-byte cap: "
        + verdict,
    ]
    if s.get("gptq_estimate") == "rtn+correction":
        lines.insert(
            2,
            f"GPTQ tensors predicted from RTN codes; + {s['gptq_correction_bytes']:,} ± "
            f"{s['gptq_correction_sd_bytes']:,} bytes for GPTQ (measured excess; --calib-data: exact)",
        )
    for codec, n in s.get("real_bytes", {}).items():
        lines.append(f"real {codec}: {n:,} bytes ({human_bytes(n)})")
    if "prediction_error" in s:
        lines.append(f"prediction error vs real {RECORD_CODEC}: {100 * s['prediction_error']:+.3f}%")
    return "\n".join(lines + [f"note: {n}" for n in report.notes])


def _hessians(args: argparse.Namespace) -> dict:
    """Hessians of the policy's GPTQ tensors from the calibration dataset (a cheap GPTQ pass)."""

    ctx = EvalContext.open(args.ckpt, args.calib_data)
    return ctx.hessians(resolve_policy(args.policy), args.calib_batches)


def run(args: argparse.Namespace) -> int:
    if args.code_bytes < 0:
        raise ConfigError(f"--code-bytes must be >= 0, got {args.code_bytes}")
    inputs = [args.ckpt, *[p for p in (args.calib_data, args.policy) if p and Path(p).exists()]]
    for out in (args.json, args.csv):
        if out:
            check_output(out, inputs, args.force)
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    report = entropy_report(
        args.ckpt, args.policy, measure=args.measure, codecs=codecs, code_bytes=args.code_bytes,
        progress=cli_progress(args.no_progress), hessians=_hessians(args) if args.calib_data else None,
    )  # fmt: skip
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    print(format_family_table(report) if args.by_family else format_table(report, args.sort, args.top))
    print()
    print(f"methods: {method_counts(report)}")
    print(format_totals(report))
    if args.json:
        report.to_json(args.json)
    if args.csv:
        report.to_csv(args.csv)
    return 0

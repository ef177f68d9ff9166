"""``qlab entropy CKPT``: per-tensor entropies and predicted brotli-11 bytes vs the 16 MB cap."""

from __future__ import annotations

import argparse
import math

import pandas as pd

from qlab.analysis.entropy_report import DEFAULT_CODECS, EntropyReport, entropy_report
from qlab.compress.predict import RECORD_CODEC
from qlab.errors import ConfigError
from qlab.io.atomic import check_output

HELP = "entropy and predicted compressed size of a checkpoint"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("entropy", help=HELP, description=__doc__)
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
    p.set_defaults(func=run)


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as the cap is)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(report: EntropyReport) -> str:
    """The per-tensor table as aligned text with human-readable sizes."""
    t = report.table
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
    return out.to_string(index=False)


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
    from qlab.eval.pipeline import resolve_dataset, resolve_model
    from qlab.quant.model_quant import calibration_batches, model_hessians
    from qlab.quant.policy import load_policy

    model, _ = resolve_model(args.ckpt)
    data = resolve_dataset(args.calib_data, model.config.vocab_size)
    batches = calibration_batches(data, args.calib_batches, seq_len=model.config.train_seq_len, batch_seqs=8)
    return model_hessians(model, load_policy(args.policy), batches)


def run(args: argparse.Namespace) -> int:
    if args.code_bytes < 0:
        raise ConfigError(f"--code-bytes must be >= 0, got {args.code_bytes}")
    for out in (args.json, args.csv):
        if out:
            check_output(out, [args.ckpt], args.force)
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    report = entropy_report(
        args.ckpt, args.policy, measure=args.measure, codecs=codecs, code_bytes=args.code_bytes,
        progress=not args.no_progress, hessians=_hessians(args) if args.calib_data else None,
    )  # fmt: skip
    print(format_table(report))
    print()
    print(format_totals(report))
    if args.json:
        report.to_json(args.json)
    if args.csv:
        report.to_csv(args.csv)
    return 0

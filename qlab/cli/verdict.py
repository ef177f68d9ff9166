"""``qlab verdict RECORD_DIR [--against RECORD_DIR]``: a record's seeds, bytes and budgets,
and whether it beats another by the challenge's margin (0.005 nats at p < 0.01).

Reads each seed's final ``val_loss … val_bpb`` line, submission size and times from the
folder's logs (PR #1394's format and later), compares them with ``submission.json``, and
with ``--against`` runs Welch's one-sided t-test and says how many seeds would resolve it.
``--all RECORDS`` prints one markdown row per record folder (docs/verdict.md).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from qlab.analysis.verdict import ALPHA, MARGIN_NATS, compare_records, read_record, record_summary
from qlab.cli._args import plain
from qlab.errors import ConfigError, QlabError
from qlab.io.atomic import atomic_write_json, check_output

HELP = "a record's seeds, bytes and time budgets, and the significance test against another"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verdict", help=HELP, description=plain(__doc__))
    p.add_argument("record", help="a record folder (train*.log per seed, submission.json), or with --all the "
                                  "folder of record folders")  # fmt: skip
    p.add_argument("--against", metavar="RECORD", help="the record to beat")
    p.add_argument("--margin-nats", type=float, default=MARGIN_NATS, help=f"margin (default {MARGIN_NATS})")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"significance level (default {ALPHA})")
    p.add_argument("--json", metavar="OUT", help="also write the verdict as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--all", action="store_true", help="one markdown row per record folder under RECORD")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.margin_nats >= 0 and 0 < args.alpha < 1):
        raise ConfigError("--margin-nats must be ≥ 0 and --alpha in (0, 1)")
    if args.json:
        check_output(args.json, [args.record, *([args.against] if args.against else [])], args.force)
    if args.all:
        print(markdown_rows(Path(args.record)))
        return 0
    rec = read_record(args.record)
    result: dict[str, Any] = record_summary(rec)
    print(_summary_text(result))
    if args.against:
        result = compare_records(rec, read_record(args.against), args.margin_nats, args.alpha)
        print(_comparison_text(result))
    if args.json:
        atomic_write_json(args.json, _jsonable(result))
    return 0


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _summary_text(s: dict[str, Any]) -> str:
    lines = [f"record:    {s['folder']} ({s['seeds']} seeds)"]
    for r in s["runs"]:
        dup = f"  (same run as {r['duplicate_of']}: counted once)" if r["duplicate_of"] else ""
        lines.append(
            f"  {r['log']:<28} {r['label']:<34} val_loss {r['val_loss']:.8f}  val_bpb {r['val_bpb']:.8f}  "
            f"{_fmt(r['total_bytes'], ',')} B  train {_fmt(r['train_seconds'], '.1f')} s  "
            f"eval {_fmt(r['eval_seconds'], '.1f')} s{dup}"
        )
    lines += [
        f"mean:      val_bpb {s['val_bpb']:.8f} ± {_fmt(s['val_bpb_std'], '.8f')}  "
        f"val_loss {s['val_loss']:.8f} ± {_fmt(s['val_loss_std'], '.8f')} nats/token (sample sd)",
        f"bytes:     max {_fmt(s['max_total_bytes'], ',')} of {16_000_000:,} -> "
        + {True: "fits", False: "OVER the cap", None: "not logged"}[s["fits_cap"]],
        f"time:      train ≤ {_fmt(s['max_train_seconds'], '.1f')} s, eval ≤ "
        f"{_fmt(s['max_eval_seconds'], '.1f')} s of 600 s each -> "
        + {True: "within", False: "OVER budget", None: "not logged"}[s["within_time"]],
    ]  # fmt: skip
    lines += [f"finding:   {m}" for m in s["mismatches"]] or [
        "finding:   submission.json agrees with the logs"
    ]
    return "\n".join(lines)


def _comparison_text(c: dict[str, Any]) -> str:
    need = c["seeds_needed"]
    return "\n".join([
        f"against:   {c['old']['folder']} (val_bpb {c['old']['val_bpb']:.8f}, {c['old']['seeds']} seeds)",
        f"gain:      {1e3 * c['gain_bpb']:+.3f} mBPB = {c['gain_nats']:+.5f} nats/token; margin "
        f"{c['margin_nats']} nats = {1e3 * c['margin_bpb']:.3f} mBPB",
        f"test:      Welch one-sided t = {c['t']:.3f}, df = {c['df']:.1f}, p = {c['p']:.3g} -> "
        + ("SIGNIFICANT" if c["significant"] else "not significant") + f" at p < {c['alpha']}",
        "seeds:     " + (f"{need} per record would resolve it at these means and deviations" if need
                         else "no number of seeds resolves it: the gain does not exceed the margin"),
    ])  # fmt: skip


def markdown_rows(root: Path) -> str:
    """One row per record folder: seeds, mean bpb (logs vs stated), bytes, time, findings."""
    rows = [
        "| record | seeds | val_bpb (logs) | stated | max bytes | fits | findings |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            rec = read_record(folder)
            s = record_summary(rec)
        except QlabError as exc:
            rows.append(f"| {folder.name} | – | – | – | – | – | ✗ {str(exc).replace(str(folder), '')} |")
            continue
        fits = {True: "✓", False: "✗", None: "?"}[s["fits_cap"]]
        findings = "; ".join(s["mismatches"]) or "agrees"
        stated = _fmt(rec.submission.get("val_bpb"), "")
        rows.append(f"| {folder.name} | {s['seeds']} | {s['val_bpb']:.8f} | {stated} "
                    f"| {_fmt(s['max_total_bytes'], ',')} | {fits} | {findings} |")  # fmt: skip
    return "\n".join(rows)


def _jsonable(obj: Any) -> Any:
    """JSON-ready: NaN and ±Inf (a deviation of one seed, an exact t) become null."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj

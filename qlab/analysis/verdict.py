"""Does a record beat another? The challenge's significance test, read off the logs.

A record folder of openai/parameter-golf holds one ``train*.log`` per seed and a
``submission.json`` stating means, deviations and bytes. The leaderboard asks a new record
to beat the previous one by at least 0.005 nats at p < 0.01 over seeds. This module reads
each seed's final score from its log — the last ``val_loss:… val_bpb:…`` line, the figure
every record prints last (``final_int8_zlib_roundtrip_exact``, ``legal_ttt_exact``,
``quantized_ttt_phased``, …) — with its ``Total submission size … N bytes`` and its
training and evaluation times, and checks:

* the seed mean and sample standard deviation (ddof 1) against what ``submission.json``
  states (a difference is a finding, listed, not an error);
* bytes (artifact + code ≤ 16,000,000) and the 600 s training and evaluation budgets;
* against another record: Welch's one-sided t-test of ``mean_new < mean_old − margin``.

Units: val_loss is nats per token of the record's own tokenizer, val_bpb bits per byte.
The margin is stated in nats and converted to bpb with the new record's own ratio
val_loss / val_bpb (as records state their deltas); the test runs on bpb, so records with
different tokenizers compare correctly.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from qlab.checks import is_finite_number, parse_json
from qlab.errors import DataError

__all__ = ["CAP_BYTES", "RecordRuns", "SeedRun", "compare_records", "read_record", "record_summary"]

CAP_BYTES = 16_000_000
TIME_BUDGET_S = 600.0
MARGIN_NATS = 0.005
ALPHA = 0.01

_SCORE = re.compile(
    r"(?P<label>[\w.-]*)[^\n]*?val_loss[:=]\s*(?P<loss>\d+\.\d+)\s+val_bpb[:=]\s*(?P<bpb>\d+\.\d+)"
)
_BYTES = re.compile(r"Total submission size[^:\n]*:\s*(\d+)\s*bytes")
_TRAIN_MS = re.compile(r"train_time:\s*(\d+(?:\.\d+)?)ms")
_EVAL_S = re.compile(r"total_eval_time:\s*(\d+(?:\.\d+)?)s")
_SEED = re.compile(r"seed[_-]?(\d+)|_(\d+)\.(?:log|txt)$")


@dataclass
class SeedRun:
    """One seed's log, as read: its final score and budgets (None where not logged)."""

    log: str
    seed: str | None
    label: str  # the metric line's name, e.g. "legal_ttt_exact"
    val_loss: float
    val_bpb: float
    total_bytes: int | None
    train_seconds: float | None
    eval_seconds: float | None
    duplicate_of: str | None = None  # a log with the very same final line (train.log = a seed's)


@dataclass
class RecordRuns:
    folder: str
    runs: list[SeedRun]
    submission: dict[str, Any] = field(default_factory=dict)

    @property
    def counted(self) -> list[SeedRun]:
        """The seeds that count: one run per seed, duplicated logs once."""
        return [r for r in self.runs if r.duplicate_of is None]


def parse_log(text: str, name: str) -> SeedRun | None:
    """A log's final score and budgets; None when it holds no ``val_loss … val_bpb`` line."""
    scores = list(_SCORE.finditer(text))
    if not scores:
        return None
    last = scores[-1]
    sizes, train, evals = _BYTES.findall(text), _TRAIN_MS.findall(text), _EVAL_S.findall(text)
    m = _SEED.search(name)
    return SeedRun(
        log=name,
        seed=(m.group(1) or m.group(2)) if m else None,
        label=last.group("label"),
        val_loss=float(last.group("loss")),
        val_bpb=float(last.group("bpb")),
        total_bytes=int(sizes[-1]) if sizes else None,
        train_seconds=float(train[-1]) / 1e3 if train else None,
        eval_seconds=float(evals[-1]) if evals else None,
    )


def read_record(folder: str | Path) -> RecordRuns:
    """Every seed log (``*.log``, ``*.txt`` with a score, in the folder or its ``logs/``) and
    ``submission.json`` of a record folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a record folder")
    runs: list[SeedRun] = []
    logs = [p for pattern in ("*.log", "*.txt", "logs/*.log", "logs/*.txt") for p in folder.glob(pattern)]
    for path in sorted(logs):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"{path}: unreadable ({exc.strerror})") from None
        run = parse_log(text, path.relative_to(folder).as_posix())
        if run is not None:
            runs.append(run)
    if not runs:
        raise DataError(f"{folder}: no log with a final 'val_loss:… val_bpb:…' line")
    _mark_duplicates(runs)
    sub_path = folder / "submission.json"
    sub = parse_json(sub_path.read_bytes(), str(sub_path), DataError) if sub_path.is_file() else {}
    if not isinstance(sub, dict):
        raise DataError(f"{sub_path}: expected a JSON object")
    return RecordRuns(str(folder), runs, sub)


def _mark_duplicates(runs: list[SeedRun]) -> None:
    # records often keep train.log beside train_seedN.log of the same run: count it once
    seen: dict[tuple, str] = {}
    for r in sorted(runs, key=lambda r: (r.seed is None, r.log)):
        key = (r.val_loss, r.val_bpb, r.total_bytes)
        if key in seen:
            r.duplicate_of = seen[key]
        else:
            seen[key] = r.log


def _mean_sd(xs: list[float], ddof: int = 1) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - ddof)) if len(xs) > ddof else math.nan
    return mean, sd


def record_summary(rec: RecordRuns) -> dict[str, Any]:
    """Means, deviations, budgets and the differences from what ``submission.json`` states."""
    runs = rec.counted
    bpb, sd_bpb = _mean_sd([r.val_bpb for r in runs])
    loss, sd_loss = _mean_sd([r.val_loss for r in runs])
    pop = {k: _mean_sd([getattr(r, k) for r in runs], ddof=0)[1] for k in ("val_bpb", "val_loss")}
    sizes = [r.total_bytes for r in runs if r.total_bytes is not None]
    trains = [r.train_seconds for r in runs if r.train_seconds is not None]
    evals = [r.eval_seconds for r in runs if r.eval_seconds is not None]
    out: dict[str, Any] = {
        "folder": Path(rec.folder).name, "seeds": len(runs), "val_bpb": bpb, "val_bpb_std": sd_bpb,
        "val_loss": loss, "val_loss_std": sd_loss, "nats_per_bpb": loss / bpb,
        "val_bpb_std_pop": pop["val_bpb"], "val_loss_std_pop": pop["val_loss"],
        "max_total_bytes": max(sizes) if sizes else None,
        "fits_cap": (max(sizes) <= CAP_BYTES) if sizes else None,
        "max_train_seconds": max(trains) if trains else None,
        "max_eval_seconds": max(evals) if evals else None,
        "within_time": (max(trains) <= TIME_BUDGET_S + 1.0 and (not evals or max(evals) <= TIME_BUDGET_S))
        if trains else None,
        "runs": [asdict(r) for r in rec.runs],
    }  # fmt: skip
    out["mismatches"] = _mismatches(out, rec.submission)
    return out


# submission.json key → (summary key, tolerance): stated figures are rounded by their authors
_STATED = {"val_bpb": ("val_bpb", 5e-5), "val_loss": ("val_loss", 5e-5), "val_bpb_std": ("val_bpb_std", 5e-5),
           "val_loss_std": ("val_loss_std", 5e-5)}  # fmt: skip


def _mismatches(summary: dict[str, Any], sub: dict[str, Any]) -> list[str]:
    found = []
    for key, (mine, tol) in _STATED.items():
        stated = sub.get(key)
        if not is_finite_number(stated) or abs(summary[mine] - stated) <= tol:
            continue
        if mine.endswith("_std") and abs(summary[mine + "_pop"] - stated) <= tol:
            found.append(f"{key}: submission.json {stated} is the population sd (ddof 0); the sample sd of "
                         f"the logs is {summary[mine]:.8f}")  # fmt: skip
        else:
            found.append(f"{key}: submission.json {stated}, logs {summary[mine]:.8f}")
    stated_bytes = sub.get("bytes_total")
    if is_finite_number(stated_bytes) and summary["max_total_bytes"] not in (None, stated_bytes):
        found.append(f"bytes_total: submission.json {stated_bytes}, logs (max) {summary['max_total_bytes']}")
    seeds = sub.get("seeds")
    if isinstance(seeds, list) and len(seeds) != summary["seeds"]:
        found.append(f"seeds: submission.json lists {len(seeds)}, {summary['seeds']} distinct logs")
    return found


def compare_records(
    new: RecordRuns, old: RecordRuns, margin_nats: float = MARGIN_NATS, alpha: float = ALPHA
) -> dict[str, Any]:
    """Welch's one-sided test that ``new`` beats ``old`` by ``margin_nats`` (in the new
    record's nats per token, converted to bpb with its own ratio), and the seeds per
    record that would resolve it at ``alpha`` if means and deviations held."""
    a, b = record_summary(new), record_summary(old)
    if a["seeds"] < 2 or b["seeds"] < 2:
        raise DataError("a t-test needs at least 2 seeds on each side")
    margin = margin_nats / a["nats_per_bpb"]
    gain = b["val_bpb"] - a["val_bpb"]
    t, df = _welch(gain - margin, a["val_bpb_std"], a["seeds"], b["val_bpb_std"], b["seeds"])
    p = float(stats.t.sf(t, df)) if math.isfinite(t) else (0.0 if t > 0 else 1.0)
    return {
        "gain_bpb": gain, "gain_nats": gain * a["nats_per_bpb"], "margin_bpb": margin,
        "margin_nats": margin_nats,
        "t": t, "df": df, "p": p, "significant": bool(p < alpha), "alpha": alpha,
        "seeds_needed": _seeds_needed(gain - margin, a["val_bpb_std"], b["val_bpb_std"], alpha),
        "new": a, "old": b,
    }  # fmt: skip


def _welch(diff: float, s1: float, n1: int, s2: float, n2: int) -> tuple[float, float]:
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    if v1 + v2 == 0:
        return (math.inf if diff > 0 else -math.inf), float(n1 + n2 - 2)
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    return diff / math.sqrt(v1 + v2), df


def _seeds_needed(diff: float, s1: float, s2: float, alpha: float, most: int = 100) -> int | None:
    """Seeds per record (the same on both sides) for p < alpha at these means and deviations."""
    if diff <= 0:
        return None
    for n in range(2, most + 1):
        t, df = _welch(diff, s1, n, s2, n)
        if not math.isfinite(t) or stats.t.sf(t, df) < alpha:
            return n
    return None

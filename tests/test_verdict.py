"""qlab verdict on record folders written here in the leaderboard's log formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from qlab.analysis.verdict import compare_records, read_record, record_summary
from qlab.cli import main

CODE_LISTING = '    log0(f"Total submission size int8+zlib: {quant_file_bytes + code_bytes} bytes")\n'


def _log(loss: float, bpb: float, size: int, train_ms: float, label: str, eval_s: float | None = None) -> str:
    lines = [
        CODE_LISTING,  # records print their own source into the log: no number there
        "step:100/9000 val_loss:2.9000 val_bpb:1.4000 train_time:60000ms step_avg:600.00ms\n",
        f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:7094/9000\n",
        "diagnostic quantized val_loss:9.00000000 val_bpb:9.00000000 eval_time:1000ms\n",
        f"Total submission size int6+zstd: {size} bytes\n",
        f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:80000ms\n",
    ]
    if eval_s is not None:
        lines.append(f"total_eval_time:{eval_s}s\n")
    return "".join(lines)


def _record(root: Path, name: str, runs: dict[str, tuple[float, float, int]], **submission) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for seed, (loss, bpb, size) in runs.items():
        (folder / f"train_seed{seed}.log").write_text(
            _log(loss, bpb, size, 599_500, "legal_ttt_exact", 480.5)
        )
    (folder / "submission.json").write_text(json.dumps(submission))
    return folder


NEW = {
    "42": (2.7900, 1.0800, 15_990_000),
    "0": (2.7910, 1.0804, 15_991_000),
    "1234": (2.7895, 1.0798, 15_989_000),
}
OLD = {
    "1": (2.8000, 1.0840, 15_950_000),
    "2": (2.8020, 1.0848, 15_951_000),
    "3": (2.7990, 1.0836, 15_952_000),
}


def test_seed_logs_are_read_as_the_records_print_them(tmp_path):
    new = _record(tmp_path, "new", NEW, val_bpb=1.08006667, val_bpb_std=0.00024944)
    (new / "train.log").write_text((new / "train_seed42.log").read_text())  # the same run, kept twice
    rec = read_record(new)
    assert len(rec.runs) == 4 and len(rec.counted) == 3
    seed42 = next(r for r in rec.runs if r.log == "train_seed42.log")
    assert (seed42.seed, seed42.label, seed42.val_bpb, seed42.total_bytes) == (
        "42",
        "legal_ttt_exact",
        1.08,
        15_990_000,
    )
    assert seed42.train_seconds == pytest.approx(599.5) and seed42.eval_seconds == pytest.approx(480.5)
    s = record_summary(rec)
    bpbs = [v[1] for v in NEW.values()]
    mean = sum(bpbs) / 3
    sd = math.sqrt(sum((b - mean) ** 2 for b in bpbs) / 2)
    assert s["val_bpb"] == pytest.approx(mean) and s["val_bpb_std"] == pytest.approx(sd)
    assert s["fits_cap"] and s["within_time"] and s["max_total_bytes"] == 15_991_000
    # the stated sd is the population one (ddof 0): said so, not called a plain mismatch
    assert s["mismatches"] == [
        "val_bpb_std: submission.json 0.00024944 is the population sd (ddof 0); the sample sd of the "
        f"logs is {sd:.8f}"
    ]


def test_the_welch_test_against_scipy_and_the_seeds_needed(tmp_path):
    new, old = read_record(_record(tmp_path, "new", NEW)), read_record(_record(tmp_path, "old", OLD))
    c = compare_records(new, old)
    nats_per_bpb = (sum(v[0] for v in NEW.values()) / 3) / (sum(v[1] for v in NEW.values()) / 3)
    margin = 0.005 / nats_per_bpb
    ref = stats.ttest_ind([v[1] for v in OLD.values()], [v[1] + margin for v in NEW.values()],
                          equal_var=False, alternative="greater")  # fmt: skip
    assert c["t"] == pytest.approx(ref.statistic) and c["p"] == pytest.approx(ref.pvalue)
    assert c["margin_bpb"] == pytest.approx(margin) and c["gain_nats"] == pytest.approx(
        c["gain_bpb"] * nats_per_bpb
    )
    n = c["seeds_needed"]
    assert n is not None and c["significant"] == (n <= 3)
    s1, s2, diff = c["new"]["val_bpb_std"], c["old"]["val_bpb_std"], c["gain_bpb"] - margin

    def p_at(k: int) -> float:
        return stats.ttest_ind_from_stats(
            diff, s2, k, 0.0, s1, k, equal_var=False, alternative="greater"
        ).pvalue

    assert p_at(n) < 0.01 and (n == 2 or p_at(n - 1) >= 0.01)
    # a gain under the margin is never resolved, whatever the seeds
    assert compare_records(old, new)["seeds_needed"] is None


def test_cli_table_json_and_a_record_over_the_cap(tmp_path, capsys):
    new = _record(tmp_path, "new", NEW, val_bpb=1.0805)
    over = _record(tmp_path, "over", {"7": (2.79, 1.08, 16_000_001), "8": (2.79, 1.0801, 15_000_000)})
    out = tmp_path / "v.json"
    assert (
        main(["verdict", str(new), "--against", str(_record(tmp_path, "old", OLD)), "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "Welch one-sided" in text and "val_bpb: submission.json 1.0805" in text
    data = json.loads(out.read_text())
    assert data["new"]["seeds"] == 3 and 0 <= data["p"] <= 1
    assert main(["verdict", str(over)]) == 0
    assert "OVER the cap" in capsys.readouterr().out
    assert main(["verdict", str(tmp_path), "--all"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 + 3 and any(r.startswith("| over |") and "| ✗ |" in r for r in rows)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verdict", str(empty)]) == 2

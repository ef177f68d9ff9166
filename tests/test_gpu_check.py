"""`make gpu-check` must at least run on a CPU: the same script, tiny preset, a few steps."""

from __future__ import annotations

import json

from benchmarks.gpu_check import main


def test_gpu_check_dry_runs_on_cpu(tmp_path, capsys):
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    keys = ("train tokens/s per GPU", "NS5 seconds", "GPTQ codes identical to CPU", "sliding eval tokens/s")
    for key in keys:
        assert key in table
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rows["train steps"] == 3 and rows["GPTQ codes identical to CPU"] == 1.0
    assert rows["sliding eval tokens/s"] > 0

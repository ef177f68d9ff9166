"""docs/cluster's scripts, run for real with stand-ins for the cluster's own commands:
``torchrun`` (one local process) and ``sbatch`` (records what it was asked to submit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qlab.analysis.matrix import load_spec, plan_cells, with_overrides

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "docs" / "cluster"
SMOKE = ROOT / "qlab" / "resources" / "matrix" / "smoke.toml"


def _bin(tmp_path: Path) -> Path:
    """A folder of stand-ins: torchrun runs its module in this Python; sbatch logs and
    answers a job id; qlab is this Python's qlab."""
    b = tmp_path / "bin"
    b.mkdir()
    py = sys.executable
    (b / "torchrun").write_text(
        f'#!/usr/bin/env bash\nwhile [ "$1" != "-m" ]; do shift; done\nexec "{py}" "$@"\n'
    )
    (b / "sbatch").write_text(
        '#!/usr/bin/env bash\necho "$@" >> "$SBATCH_LOG"\necho $((1000 + $(wc -l < "$SBATCH_LOG")))\n'
    )
    (b / "qlab").write_text(f'#!/usr/bin/env bash\nexec "{py}" -m qlab "$@"\n')
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env["PATH"] = f"{_bin(tmp_path)}:{env['PATH']}"
    return env


def test_the_array_task_script_runs_its_cell(tmp_path, tiny_dataset):
    out = tmp_path / "grid"
    env = _env(tmp_path, SPEC=str(SMOKE), OUT=str(out), DATA=str(tiny_dataset.root), NPROC="1",
               SLURM_ARRAY_TASK_ID="1")  # fmt: skip
    run = subprocess.run(
        ["bash", str(CLUSTER / "matrix_cell.sbatch")], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    cell = plan_cells(with_overrides(load_spec(SMOKE), data=str(tiny_dataset.root)))[1]
    done = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert done == [cell.cell_id]
    assert json.loads((out / "cells" / f"{cell.cell_id}.json").read_text())["cost"]["device_hours"] > 0


def test_the_submit_script_sizes_the_array_and_chains_the_merge(tmp_path):
    log = tmp_path / "sbatch.log"
    env = _env(tmp_path, SPEC=str(SMOKE), OUT=str(tmp_path / "grid"), SBATCH_LOG=str(log))
    run = subprocess.run(["bash", str(CLUSTER / "submit_grid.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    n = len(plan_cells(load_spec(SMOKE)))
    array, merge = log.read_text().splitlines()
    assert f"--array=0-{n - 1}" in array and array.endswith("matrix_cell.sbatch")
    assert "--dependency=afterany:1001" in merge and "qlab matrix merge" in merge
    assert f"{n} tasks" in run.stdout

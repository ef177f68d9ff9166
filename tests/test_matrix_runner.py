"""The smoke grid end to end: train, measure, kill -9 mid-run and resume, merge, report, CLI.

One module-scoped run does the expensive part once: ``qlab matrix run`` on
qlab/resources/matrix/smoke.toml (2 bases × 4 variants × 2 seeds = 16 cells) in a subprocess,
SIGKILLed as soon as the first cell's result appears, then resumed in-process to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qlab.analysis.matrix import (
    cell_result_path,
    collect_results,
    load_spec,
    merge_results,
    plan_cells,
    run_matrix,
    with_overrides,
)
from qlab.analysis.papers import reg_quant_matrix
from qlab.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "qlab" / "resources" / "matrix" / "smoke.toml"
MEASURED = ["pipeline", "hidden", "geometry", "variant", "regs", "lambdas", "seed", "base", "eval_key"]


@pytest.fixture(autouse=True)
def one_thread():
    # the subprocess runs with OMP_NUM_THREADS=1; equal thread counts give bit-equal results
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec(tiny_dataset):
    return with_overrides(load_spec(SMOKE), data=str(tiny_dataset.root), device="cpu")


@pytest.fixture(scope="module")
def killed_run(spec, tiny_dataset, tmp_path_factory):
    """(out dir, {finished-before-kill cell id: mtime_ns}, status table of the resumed run)."""
    out = tmp_path_factory.mktemp("matrix") / "out"
    cmd = [
        sys.executable,
        "-m",
        "qlab",
        "matrix",
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--data",
        str(tiny_dataset.root),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cells = out / "cells"
    deadline = time.time() + 180
    while not (cells.is_dir() and any(cells.glob("*.json"))):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no cell finished within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: same kernels, same bits
    try:
        status = run_matrix(spec, out)
    finally:
        torch.set_num_threads(threads)
    return out, done, status


def measured(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: data[k] for k in MEASURED}


def test_kill_loses_only_the_cell_in_progress(spec, killed_run):
    out, done, status = killed_run
    ids = [c.cell_id for c in plan_cells(spec)]
    assert 1 <= len(done) < len(ids)
    by = dict(zip(status.cell_id, status.status))
    assert sorted(by) == sorted(ids)
    assert {by[i] for i in done} == {"skipped"}  # finished cells were not recomputed …
    assert {by[i] for i in ids if i not in done} == {"trained"}
    for cell_id, mtime in done.items():  # … nor rewritten
        assert cell_result_path(out, cell_id).stat().st_mtime_ns == mtime
    assert all(cell_result_path(out, i).is_file() for i in ids)
    again = run_matrix(spec, out)
    assert set(again.status) == {"skipped"}


def test_resumed_results_equal_an_uninterrupted_run(spec, killed_run, tmp_path):
    out, done, _ = killed_run
    ids = [c.cell_id for c in plan_cells(spec)]
    first_done = sorted(done)[0]
    interrupted = next(i for i in ids if i not in done)  # was in progress (or not started) at the kill
    fresh = run_matrix(spec, tmp_path, cells=[first_done, interrupted])
    assert set(fresh.status) == {"trained"}
    for cell_id in (first_done, interrupted):
        assert measured(cell_result_path(tmp_path, cell_id)) == measured(cell_result_path(out, cell_id))


def test_lost_result_is_re_evaluated_without_training(spec, killed_run):
    out, _, _ = killed_run
    cell_id = plan_cells(spec)[3].cell_id
    path = cell_result_path(out, cell_id)
    before = measured(path)
    weights = out / "runs" / cell_id / "model.safetensors"
    w_mtime = weights.stat().st_mtime_ns
    path.unlink()
    status = run_matrix(spec, out, cells=[cell_id])
    assert list(status.status) == ["evaluated"] and weights.stat().st_mtime_ns == w_mtime
    assert measured(path) == before


def test_merged_tables(spec, killed_run):
    out, _, _ = killed_run
    res = merge_results(out)
    for name in ("results.csv", "hidden.csv", "geometry.csv", "results.json"):
        assert (out / name).is_file()
    pipe, hidden = res.pipeline, res.hidden
    assert len(pipe) == 16 * 2 and len(hidden) == 16 * 7 and len(res.geometry) == 16
    assert pd.read_csv(out / "results.csv").shape == pipe.shape
    assert set(pipe.policy) == {"int6_all", "int4_all"} and res.control == "no-reg"
    stages = ["pre_quant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb"]
    assert np.isfinite(pipe[stages].to_numpy()).all() and pipe[stages].gt(0).all().all()
    assert pipe.prequant_ttt_bpb.isna().all()
    assert np.allclose(pipe.quant_tax_mbpb, 1e3 * (pipe.quantized_bpb - pipe.pre_quant_bpb))
    assert np.allclose(pipe.final_bpb, pipe.ttt_bpb) and (pipe.artifact_bytes > 1000).all()
    # pre-quant bpb is a property of the cell, shared by its policies; int4 costs more than int6
    assert pipe.groupby("cell_id").pre_quant_bpb.nunique().eq(1).all()
    tax = pipe.groupby("policy").quant_tax_mbpb.mean()
    assert tax["int4_all"] > tax["int6_all"]
    bytes_ = pipe.pivot_table(index="cell_id", columns="policy", values="artifact_bytes")
    assert (bytes_.int4_all < bytes_.int6_all).all()
    # hidden-state schemes: int8 per-row always distorts less than int4 per-row
    wide = hidden.pivot_table(index="cell_id", columns="scheme", values="l2_distortion")
    assert (wide["int8 sym per-row"] < wide["int4 sym per-row"]).all()
    # qlab rows concatenate with the paper's published matrix
    both = pd.concat([reg_quant_matrix(), hidden], ignore_index=True)
    assert set(both.source) == {"paper:pr2011", "qlab"} and both.l2_distortion.notna().all()


def test_cli_list_report_paper(spec, killed_run, tmp_path, capsys, tiny_dataset):
    out, _, _ = killed_run
    assert main(["matrix", "list", str(SMOKE), "--shard", "1/3"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [c.cell_id for c in plan_cells(spec)][1::3]
    assert main(["matrix", "merge", str(out)]) == 0
    assert main(["matrix", "report", str(out), "--policy", "int4_all", "--figures", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "paired across seeds" in text and "cross-base sign table" in text and "λ budget" in text
    pngs = {p.name for p in tmp_path.glob("*.png")}
    # named by their FIGURES ids, as `qlab figures` names them
    assert {"pr2011_matrix_hidden_heatmaps.png", "pr2011_matrix_paired_deltas.png",
            "pr2011_matrix_cross_base_signs.png"} <= pngs  # fmt: skip
    assert main(["matrix", "paper", str(out)]) == 0
    assert "paper:pr2011" in capsys.readouterr().out
    assert main(["matrix", "report", str(out), "--policy", "nope"]) == 2
    assert (
        main(
            [
                "matrix",
                "run",
                str(SMOKE),
                "--out",
                str(out),
                "--cell",
                "nope",
                "--data",
                str(tiny_dataset.root),
            ]
        )
        == 2
    )


def test_corrupt_cell_file_is_named(killed_run, tmp_path):
    out, _, _ = killed_run
    from qlab.errors import DataError

    bad = tmp_path / "cells"
    bad.mkdir()
    (bad / "x.json").write_text('{"cell_id": "x"')
    with pytest.raises(DataError, match="x.json"):
        collect_results(tmp_path)
    with pytest.raises(DataError, match="no cell results"):
        collect_results(tmp_path / "empty")


def test_a_matrix_cell_and_qlab_quantize_report_the_same_bytes_and_bpb(
    killed_run, tiny_dataset, tmp_path, capsys, monkeypatch
):
    """One pipeline: a cell's measurement is run_pipeline, exactly what `qlab quantize` runs."""
    from qlab.analysis.matrix.measure import measure_pipeline
    from qlab.analysis.matrix.spec import EvalSpec
    from qlab.eval.context import EvalContext
    from qlab.loaders import load_model
    from qlab.quant.policy import load_policy

    out, _, _ = killed_run
    run_dir = next((out / "runs").iterdir())
    gptq = {"rules": [{"pattern": "*", "ndim": 2, "spec": {"method": "gptq", "bits": 6, "clip": "sdclip",
                                                            "clip_params": {"k": 12.85}}}],
            "default": {"method": "passthrough", "passthrough_dtype": "fp16"}}  # fmt: skip
    policy_file = tmp_path / "gptq6.json"
    policy_file.write_text(json.dumps({"name": "gptq6", **gptq}))
    model, mc = load_model(run_dir)
    seq = mc.train_seq_len
    ctx = EvalContext.open(model, tiny_dataset, seq)
    spec = EvalSpec(val_max_tokens=2049, batch_seqs=8, sliding_stride=32, calibration_seqs=16)
    (cell,) = measure_pipeline(ctx, spec, {"gptq6": load_policy(policy_file)}, source=f"runs/{run_dir.name}")
    artifact = tmp_path / "m.qlab"
    monkeypatch.chdir(out)  # the cell names its run as `qlab quantize runs/<cell id>` does from here
    args = ["quantize", f"runs/{run_dir.name}", "--data", str(tiny_dataset.root),
            "--policy", str(policy_file),
            "--calib-batches", "2", "--calib-batch-seqs", "8", "--seq-len", str(seq), "--stride", "32",
            "--eval-tokens", "2049", "--out", str(artifact), "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert artifact.stat().st_size == cell["artifact_bytes"]  # the real container, byte for byte
    assert f"{cell['artifact_bytes']:,} B" in text and "GPTQ with Hessians" in text
    for stage, label in (
        ("pre_quant_bpb", "pre-quant"),
        ("quantized_bpb", "quantized"),
        ("sliding_bpb", "sliding"),
    ):
        assert f"{label + ':':<14} val_bpb {cell[stage]:.4f}" in text, (stage, text)
    tax = 1e3 * (cell["quantized_bpb"] - cell["pre_quant_bpb"])
    assert f"quant tax {tax:+.2f} mBPB" in text


# ------------------------------------------------------------------ the cluster recipe


def test_a_fake_slurm_array_runs_one_cell_per_task(
    spec, killed_run, tiny_dataset, tmp_path, monkeypatch, capsys
):
    """Array task i runs cell i of `matrix list` (index order is the sorted ids on every
    machine); retrained from scratch in a fresh folder it measures the same numbers."""
    import shutil

    out, _, _ = killed_run
    cells = plan_cells(spec)
    assert main(["matrix", "list", str(SMOKE), "--count"]) == 0
    assert capsys.readouterr().out.strip() == str(len(cells))
    assert main(["matrix", "list", str(SMOKE)]) == 0
    listed = [(line.split("\t")[0], line.split("\t")[-1]) for line in capsys.readouterr().out.splitlines()]
    assert listed == [(c.cell_id, f"index={i}") for i, c in enumerate(cells)]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = ["matrix", "run", str(SMOKE), "--data", str(tiny_dataset.root), "--device", "cpu"]
    for i in (0, 5, len(cells) - 1):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
        assert main([*args, "--out", str(copy)]) == 0
        assert "1 cell(s) in this shard: 1 skipped" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert main([*args, "--out", str(fresh)]) == 0
    done = list((fresh / "cells").glob("*.json"))
    assert [p.stem for p in done] == [cells[2].cell_id]
    assert measured(done[0]) == measured(cell_result_path(out, cells[2].cell_id))
    cost = json.loads(done[0].read_text())["cost"]
    assert cost["device"] == "cpu" and cost["world_size"] == 1 and cost["device_hours"] > 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(len(cells)))
    assert main([*args, "--out", str(fresh)]) == 2
    assert "outside the grid" in capsys.readouterr().err
    assert main([*args, "--out", str(fresh), "--cell-index", "1", "--shard", "0/2"]) == 2


def test_merging_two_machines_folders_equals_one_folders_run(spec, killed_run, tmp_path):
    import shutil

    out, _, _ = killed_run
    whole = merge_results(out, out=tmp_path / "whole")
    parts = []
    for k in range(2):
        part = tmp_path / f"machine{k}"
        (part / "cells").mkdir(parents=True)
        shutil.copy(out / "spec.json", part / "spec.json")
        for i, c in enumerate(plan_cells(spec)):
            if i % 2 == k:
                shutil.copy(cell_result_path(out, c.cell_id), part / "cells")
        parts.append(part)
    merged = merge_results(*parts, out=tmp_path / "merged")
    pd.testing.assert_frame_equal(merged.pipeline, whole.pipeline)
    pd.testing.assert_frame_equal(merged.hidden, whole.hidden)
    assert (tmp_path / "merged" / "results.csv").read_text() == (
        tmp_path / "whole" / "results.csv"
    ).read_text()
    other = tmp_path / "other"
    (other / "cells").mkdir(parents=True)
    shutil.copy(cell_result_path(out, plan_cells(spec)[0].cell_id), other / "cells")
    (other / "spec.json").write_text('{"name": "another grid"}')
    from qlab.errors import DataError

    with pytest.raises(DataError, match="different grid specs"):
        merge_results(parts[0], other)

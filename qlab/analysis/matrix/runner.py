"""Run the cells of a matrix: train once per (base, variant, seed), measure, write atomically.

Layout of an output folder::

    OUT/spec.json                 the spec as run (informational)
    OUT/runs/<cell-id>/           the cell's qlab run directory (checkpoint, metrics.jsonl)
    OUT/runs/<cell-id>/matrix_train.json   written once training has finished
    OUT/cells/<cell-id>.json      the cell's measurements — written last, atomically

Resume rules, so that killing the process at any moment loses at most the cell in
progress: a cell whose result file exists and carries the current evaluation key is
skipped; a cell whose training finished (``matrix_train.json``) but whose result is
missing or stale is only re-evaluated; otherwise it is trained, resuming from the run
directory's last checkpoint if one was written (``checkpoint_every``). All writes go
through :mod:`qlab.io.atomic` or the checkpoint's two-phase commit.

Sharding (``shard=(i, n)``) deals the sorted cell ids round-robin, so the n processes of
a SLURM array (``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) run disjoint
cells into the same OUT folder and ``qlab matrix merge OUT`` collects them. Under
``torchrun`` every rank trains (DDP) and rank 0 alone measures and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from qlab.analysis.matrix.measure import measure_hidden, measure_pipeline
from qlab.analysis.matrix.spec import Cell, MatrixSpec, plan_cells, resolve_base, shard_cells, spec_policy
from qlab.errors import ConfigError, DataError
from qlab.eval.context import EvalContext
from qlab.io.atomic import atomic_write_json
from qlab.io.outputs import folder_kind, output_lock, refuse_inputs
from qlab.loaders import load_model
from qlab.train.setup import open_training_data, resolve_device
from qlab.train.trainer import train

__all__ = ["CELLS_DIR", "RUNS_DIR", "cell_result_path", "run_cell", "run_matrix", "with_overrides"]

CELLS_DIR = "cells"
RUNS_DIR = "runs"
TRAIN_DONE = "matrix_train.json"
SPEC_NAME = "spec.json"
RESULT_FORMAT = 2  # 2: the pipeline is run_pipeline's (real artifact bytes); older cells are re-evaluated


def cell_result_path(out: str | Path, cell_id: str) -> Path:
    return Path(out) / CELLS_DIR / f"{cell_id}.json"


def with_overrides(spec: MatrixSpec, data: str | None = None, device: str | None = None) -> MatrixSpec:
    """The spec with every base's dataset and/or the device replaced (neither changes cell ids)."""
    if data is not None:
        path = data if data == "embedded" else str(Path(data).resolve())
        spec = dataclasses.replace(spec, bases=tuple(dataclasses.replace(b, data=path) for b in spec.bases))
    if device is not None:
        spec = dataclasses.replace(spec, device=device)
    return spec


def run_matrix(
    spec: MatrixSpec,
    out: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    cells: list[str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Run this shard's cells (or only the ``cells`` ids given); one status row per cell.

    Status is ``skipped`` (finished before), ``evaluated`` (trained before, measured now)
    or ``trained`` (trained and measured now).
    """
    out = Path(out)
    todo = shard_cells(plan_cells(spec), *shard)
    if cells is not None:
        known = {c.cell_id for c in plan_cells(spec)}
        unknown = sorted(set(cells) - known)
        if unknown:
            raise ConfigError(f"unknown cell id(s) {unknown}; `qlab matrix list SPEC` shows them")
        todo = [c for c in todo if c.cell_id in set(cells)]
    if _rank() == 0:
        _claim(out, spec)
    rows = []
    for cell in tqdm(todo, desc="matrix", disable=not progress):
        t0 = time.perf_counter()
        status = run_cell(spec, cell, out, progress=progress)
        rows.append({"cell_id": cell.cell_id, "status": status, "seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows, columns=["cell_id", "status", "seconds"])


def _claim(out: Path, spec: MatrixSpec) -> None:
    """Write the spec into ``out``; a folder holding another spec's cells (or anything
    else) is refused: its cells would be mixed with this grid's under the same ids."""
    refuse_inputs(out, [b.data for b in spec.bases if b.data and b.data != "embedded"])
    kind = folder_kind(out) if out.is_dir() else None
    if kind is not None:
        raise ConfigError(f"{out}: holds a {kind}; choose another --out for the grid")
    path = out / SPEC_NAME
    if path.is_file():
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(spec.to_dict()))
        except (UnicodeDecodeError, ValueError, RecursionError):
            same = False
        if not same:
            raise ConfigError(
                f"{out}: holds the cells of another grid spec ({path}); choose another --out "
                "(each grid gets its own folder; shards of one grid share it)"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out}: is not empty and holds no grid; choose another --out")
    atomic_write_json(path, spec.to_dict())


def run_cell(spec: MatrixSpec, cell: Cell, out: str | Path, *, progress: bool = False) -> str:
    """Train (if needed) and measure one cell; returns ``skipped``, ``evaluated`` or ``trained``."""
    out = Path(out)
    if _rank() != 0:
        return _run_cell(spec, cell, out, progress)
    # one process per cell: shards of an array share the folder, never a cell
    with output_lock(out / CELLS_DIR, f"cell {cell.cell_id}", name=f".{cell.cell_id}.lock"):
        return _run_cell(spec, cell, out, progress)


def _run_cell(spec: MatrixSpec, cell: Cell, out: Path, progress: bool) -> str:
    result_path = cell_result_path(out, cell.cell_id)
    eval_key = spec.eval.key()
    if _finished(result_path, eval_key):
        return "skipped"
    run_dir = out / RUNS_DIR / cell.cell_id
    tc, mc = resolve_base(spec, spec.base(cell.base), cell.variant, cell.seed, str(run_dir))
    status = "evaluated"
    if not (run_dir / TRAIN_DONE).is_file():
        summary = _train(tc, mc, progress)
        status = "trained"
        if _rank() != 0:
            return status
        atomic_write_json(run_dir / TRAIN_DONE, summary)
    elif _rank() != 0:
        return "skipped"
    summary = json.loads((run_dir / TRAIN_DONE).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    record = _measure(spec, cell, tc, run_dir, progress)
    record |= {"cell_id": cell.cell_id, "eval_key": eval_key, "train_result": summary,
               "cost": _cost(summary, time.perf_counter() - t0, tc.device)}  # fmt: skip
    atomic_write_json(result_path, _jsonable(record))
    return status


def _cost(summary: Mapping[str, Any], measure_seconds: float, device: str) -> dict[str, Any]:
    """What a cell cost: wall seconds of training (as the trainer timed it) and of the
    measurement, the device and world size, and device-hours (wall × processes), the unit
    a cluster bills — so a grid's budget can be read off its cells."""
    world = int(summary.get("world_size", 1) or 1)
    train_s = float(summary.get("train_seconds", 0.0) or 0.0)
    kind = torch.device(resolve_device(device)).type
    name = (
        torch.cuda.get_device_name() if kind == "cuda" and torch.cuda.is_available() else platform.processor()
    )
    return {
        "train_seconds": train_s, "measure_seconds": measure_seconds, "device": kind, "device_name": name,
        "world_size": world, "device_hours": (train_s * world + measure_seconds) / 3600.0,
    }  # fmt: skip


def _finished(path: Path, eval_key: str) -> bool:
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); delete it to recompute the cell") from exc
    return isinstance(data, dict) and data.get("eval_key") == eval_key and data.get("format") == RESULT_FORMAT


def _train(tc, mc, progress: bool) -> dict[str, Any]:
    r = train(tc, mc, resume=True, progress=progress)
    return {
        "steps": r.steps,
        "tokens_seen": r.tokens_seen,
        "train_seconds": r.train_seconds,
        "train_loss": r.train_loss,
        "val_bpb": r.val_bpb,
        "stopped_by": r.stopped_by,
        "world_size": r.world_size,
    }


def _measure(spec: MatrixSpec, cell: Cell, tc, run_dir: Path, progress: bool) -> dict[str, Any]:
    device = torch.device(resolve_device(tc.device))
    model, mc = load_model(run_dir, device)
    # the run as `qlab quantize runs/<cell id>` from the matrix folder names it: no absolute
    # path in the artifact, so a cell's bytes do not depend on where the matrix lives
    source = f"{RUNS_DIR}/{cell.cell_id}"
    # matrix cells score at the training length, with the run's own tokenizer
    ctx = EvalContext.open(model, open_training_data(tc, mc.vocab_size), tc.train_seq_len,
                           tokenizer_path=tc.tokenizer_path)  # fmt: skip
    policies = {name: spec_policy(spec, name) for name in spec.eval.weight_policies}
    pipeline = measure_pipeline(ctx, spec.eval, policies, source=source, progress=progress)
    hidden, geometry = measure_hidden(ctx, spec.eval)
    v = cell.variant
    return {
        "format": RESULT_FORMAT,
        "spec": spec.name,
        "base": cell.base,
        "variant": v.label,
        "regs": v.reg_names,
        "lambda": v.lam,
        "lambdas": v.lambdas,
        "seed": cell.seed,
        "model": mc.to_dict(),
        "train": tc.to_dict(),
        "pipeline": pipeline,
        "hidden": hidden,
        "geometry": geometry,
    }


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _jsonable(obj: Any) -> Any:
    """NaN/Inf → None (strict JSON), tuples → lists, numpy/torch scalars → Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

"""The end-to-end demo behind ``make demo``: everything on the embedded corpus, on CPU.

Each step is a small function that reads what earlier steps left in a shared
:class:`DemoState` and records what it wrote. Steps reuse finished work (a trained
checkpoint, a built dataset) so a second ``make demo`` is quick; ``fresh=True`` redoes
everything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlab.analysis.entropy_report import entropy_report
from qlab.analysis.fingerprint import fingerprint, write_fingerprint
from qlab.analysis.matrix import load_spec, merge_results, run_matrix, with_overrides
from qlab.analysis.rd import sweep
from qlab.data import default_dataset
from qlab.data.dataset import DatasetInfo
from qlab.data.shards import read_shard
from qlab.errors import ConfigError
from qlab.eval.baselines import uniform_bpb, unigram_bpb
from qlab.eval.context import EvalContext
from qlab.eval.quantize import quantize_checkpoint
from qlab.figures import generate_figures
from qlab.io.atomic import atomic_write_json, atomic_write_text
from qlab.io.checkpoint import has_checkpoint, read_config
from qlab.train.config import resolve_configs
from qlab.train.trainer import train

RESOURCES = Path(__file__).resolve().parent / "resources"


def demo_threads(requested: int | None = None, env: dict[str, str] | None = None) -> int:
    """Threads for the demo's torch work: ``requested``; else ``OMP_NUM_THREADS`` when
    set; else the cores this process may use minus the whole cores the 1-minute load
    average says are busy (at least 1). On a busy 2-core machine all-core torch spin-waits against the other
    load and ran 2.3x slower than one thread; on an idle machine all cores win."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"threads must be ≥ 1, got {requested}")
        return requested
    env = dict(os.environ) if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # whole cores busy only: the load a just-finished command leaves (~0.8 for a minute)
    # must not halve the demo's threads (measured: 127 s at 2 threads vs 195 s at 1)
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


@dataclass
class DemoState:
    """What the demo has produced so far: numbers for the report and paths written."""

    out_dir: Path
    iterations: int | None = None
    fresh: bool = False
    progress: bool = True
    dataset: DatasetInfo | None = None
    run_dir: Path | None = None
    numbers: dict[str, Any] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    # Steps after the first two read these; the steps run in order, so they are set.
    @property
    def data(self) -> DatasetInfo:
        assert self.dataset is not None, "step_dataset runs first"
        return self.dataset

    @property
    def run(self) -> Path:
        assert self.run_dir is not None, "step_train runs first"
        return self.run_dir


def step_dataset(state: DemoState) -> None:
    """Tokenize the embedded corpus (Python's own documentation) into shards, once."""
    info = default_dataset(cache_dir=state.out_dir / "data")
    state.dataset = info
    state.numbers.update(
        vocab_size=info.vocab_size, train_tokens=info.train_tokens, val_tokens=info.val_tokens
    )
    state.written["dataset"] = info.root


def step_train(state: DemoState) -> None:
    """Train the ``tiny`` preset; reuse a finished run of the same length unless ``fresh``."""

    run_dir = state.out_dir / "runs" / "tiny"
    overrides: dict[str, Any] = {"data": str(state.data.root), "out_dir": str(run_dir)}
    if state.iterations is not None:
        overrides["iterations"] = state.iterations
    train_cfg, model_cfg = resolve_configs("tiny", overrides, {"vocab_size": state.data.vocab_size}, env={})
    state.run_dir = run_dir
    state.written["checkpoint"] = run_dir
    if state.fresh and run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own run inside its output folder, retrained on request
    if not state.fresh and has_checkpoint(run_dir):
        saved = read_config(run_dir)
        if saved.get("step") == train_cfg.iterations:
            state.numbers["train_reused"] = True
            return
    result = train(
        train_cfg, model_cfg, resume=not state.fresh and has_checkpoint(run_dir), progress=state.progress
    )
    state.numbers.update(
        train_steps=result.steps,
        train_tokens_per_s=result.tokens_per_second,
        train_seconds=result.train_seconds,
        train_loss=result.train_loss,
    )


def step_evaluate(state: DemoState) -> None:
    """Full validation bpb of the trained model beside the unigram and uniform baselines."""

    info = state.data
    ctx = EvalContext.open(state.run, info)
    val, tables = ctx.validation()
    train_tokens = torch.from_numpy(
        np.concatenate([read_shard(f).astype(np.int64) for f in info.train_files])
    )
    result = ctx.evaluate(batch_seqs=16)
    state.numbers.update(
        val_loss=result.val_loss,
        val_bpb=result.val_bpb,
        unigram_bpb=unigram_bpb(train_tokens, val, tables, info.vocab_size),
        uniform_bpb=uniform_bpb(val, tables, info.vocab_size),
        val_tokens_scored=result.tokens,
        val_bytes=result.bytes,
    )


# The record policy sends only tensors > 65,536 elements to GPTQ; ``record_small`` is the
# same policy with the threshold scaled down to the tiny model's matrices.
DEMO_POLICY = "record_small"


def step_quantize(state: DemoState) -> None:
    """GPTQ with the record policy, the artifact on disk, and pre → post → sliding bpb."""

    # what `qlab quantize RUN --policy record_small --calib-batches 16` does, byte table measured
    result = quantize_checkpoint(state.run, DEMO_POLICY, state.data, calib_batches=16, stride=64,
                                 measure_budget=True)  # fmt: skip
    artifact = result.save(state.out_dir / "model.qlab")
    row = result.row.iloc[0]
    pipeline_csv = atomic_write_text(state.out_dir / "pipeline.csv", result.row.to_csv(index=False))
    budget_csv = atomic_write_text(state.out_dir / "budget.csv", result.budget.to_csv(index=False))
    state.numbers.update(
        pre_quant_bpb=float(row["pre_quant_bpb"]),
        quantized_bpb=float(row["quantized_bpb"]),
        sliding_bpb=float(row["sliding_bpb"]),
        quant_tax_mbpb=float(row["quant_tax_mbpb"]),
        artifact_bytes=int(row["artifact_bytes"]),
    )
    state.written.update(artifact=artifact, pipeline=pipeline_csv, budget=budget_csv)


def step_entropy(state: DemoState) -> None:
    """Per-tensor entropy and predicted bytes, checked against real compression."""

    report = entropy_report(state.run, DEMO_POLICY, measure=True, codecs=("brotli-11+shuffle",))
    path = state.out_dir / "entropy.csv"
    report.to_csv(path)
    state.numbers["entropy_totals"] = {k: v for k, v in report.totals.items() if isinstance(v, (int, float))}
    state.written["entropy"] = path


def step_sweep(state: DemoState) -> None:
    """Rate–distortion sweep of the block matrices: bits × k × clip rule."""

    df = sweep(state.run, bits=(4, 5, 6, 8), ks=(4.0, 8.0, 12.85, 20.0), min_numel=4096)
    state.written["sweep"] = atomic_write_text(state.out_dir / "sweep.csv", df.to_csv(index=False))
    state.numbers["sweep_rows"] = len(df)


def step_fingerprint(state: DemoState) -> None:
    """SVD spectra, CKA, depth trajectory and hidden-state geometry, fp vs quantized."""

    tables = fingerprint(state.run, data=state.data, policy=DEMO_POLICY, n_tokens=1024)
    folder = state.out_dir / "fingerprint"
    write_fingerprint(tables, folder)
    state.written["fingerprint"] = folder


def step_matrix(state: DemoState) -> None:
    """The smoke reg × quant matrix: two bases × regularizers × every scheme, two seeds."""

    spec = load_spec(RESOURCES / "matrix" / "smoke.toml")
    vocab = {b.model.get("vocab_size", state.data.vocab_size) for b in spec.bases}
    data = default_dataset(cache_dir=state.out_dir / "data", vocab_size=vocab.pop())
    folder = state.out_dir / "matrix"
    run_matrix(with_overrides(spec, data=str(data.root)), folder)
    merged = merge_results(folder)
    state.numbers["matrix_cells"] = int(merged.pipeline["cell_id"].nunique())
    state.written["matrix"] = folder


def step_figures(state: DemoState) -> None:
    """Every figure, measured on the demo's own checkpoint (the ``demo`` scale)."""

    folder = state.out_dir / "figures"
    written = generate_figures(
        folder,
        checkpoint=state.run,
        scale="demo",
        data=state.data.root,
        work_dir=state.out_dir / "figures_cache",
        progress=state.progress,
    )
    state.numbers["figures"] = len(written)
    state.written["figures"] = folder


STEPS: list[tuple[str, Callable[[DemoState], None]]] = [
    ("dataset", step_dataset),
    ("train", step_train),
    ("evaluate", step_evaluate),
    ("quantize", step_quantize),
    ("entropy", step_entropy),
    ("sweep", step_sweep),
    ("fingerprint", step_fingerprint),
    ("matrix", step_matrix),
    ("figures", step_figures),
]


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    iterations: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    on_step: Callable[[str, DemoState], None] | None = None,
    skip: tuple[str, ...] = (),
    on_start: Callable[[str, int, int], None] | None = None,
) -> DemoState:
    """Run the demo steps in order (all but ``skip``) and write ``report.json`` into
    ``out_dir``. ``on_start(name, i, n)`` is called before step i of n, ``on_step(name,
    state)`` after it."""
    unknown = set(skip) - {name for name, _ in STEPS}
    if unknown:
        raise ConfigError(f"unknown demo step(s) {sorted(unknown)}; steps: {[name for name, _ in STEPS]}")
    state = DemoState(out_dir=Path(out_dir), iterations=iterations, fresh=fresh, progress=progress)
    state.out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(name, step) for name, step in STEPS if name not in skip]
    for i, (name, step) in enumerate(todo, 1):
        if on_start is not None:
            on_start(name, i, len(todo))
        t0 = time.perf_counter()
        step(state)
        state.timings[name] = time.perf_counter() - t0
        if on_step is not None:
            on_step(name, state)
    report = state.out_dir / "report.json"
    atomic_write_json(
        report,
        {
            "numbers": state.numbers,
            "timings_s": state.timings,
            "written": {k: str(v) for k, v in state.written.items()},
        },
    )
    state.written["report"] = report
    return state


def report_json(state: DemoState) -> str:
    return json.dumps(state.numbers, indent=2, default=str)

"""The end-to-end demo behind ``make demo``: everything on the embedded corpus, on CPU.

Each step is a small function that reads what earlier steps left in a shared
:class:`DemoState` and records what it wrote. Steps reuse finished work (a trained
checkpoint, a built dataset) so a second ``make demo`` is quick; ``fresh=True`` redoes
everything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlab.data import default_dataset, load_tokenizer, load_validation_tokens
from qlab.data.dataset import DatasetInfo
from qlab.data.shards import read_shard
from qlab.data.tokenizer import build_byte_tables
from qlab.io.atomic import atomic_write_json


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
    from qlab.io.checkpoint import has_checkpoint, read_config
    from qlab.train.config import resolve_configs
    from qlab.train.trainer import train

    run_dir = state.out_dir / "runs" / "tiny"
    overrides: dict[str, Any] = {"data": str(state.dataset.root), "out_dir": str(run_dir)}
    if state.iterations is not None:
        overrides["iterations"] = state.iterations
    train_cfg, model_cfg = resolve_configs(
        "tiny", overrides, {"vocab_size": state.dataset.vocab_size}, env={}
    )
    state.run_dir = run_dir
    state.written["checkpoint"] = run_dir
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
    from qlab.eval.baselines import uniform_bpb, unigram_bpb
    from qlab.eval.bpb import evaluate_bpb
    from qlab.io.checkpoint import load_model

    model, model_cfg = load_model(state.run_dir)
    info = state.dataset
    tables = build_byte_tables(load_tokenizer(info.tokenizer_path), info.vocab_size)
    val = load_validation_tokens(info.val_files, model_cfg.eval_seq_len)
    train_tokens = torch.from_numpy(
        np.concatenate([read_shard(f).astype(np.int64) for f in info.train_files])
    )
    result = evaluate_bpb(model, val, tables, seq_len=model_cfg.eval_seq_len, batch_seqs=16)
    state.numbers.update(
        val_loss=result.val_loss,
        val_bpb=result.val_bpb,
        unigram_bpb=unigram_bpb(train_tokens, val, tables, info.vocab_size),
        uniform_bpb=uniform_bpb(val, tables, info.vocab_size),
        val_tokens_scored=result.tokens,
        val_bytes=result.bytes,
    )


STEPS: list[tuple[str, Callable[[DemoState], None]]] = [
    ("dataset", step_dataset),
    ("train", step_train),
    ("evaluate", step_evaluate),
]


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    iterations: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    on_step: Callable[[str, DemoState], None] | None = None,
) -> DemoState:
    """Run every demo step in order and write ``report.json`` into ``out_dir``."""
    state = DemoState(out_dir=Path(out_dir), iterations=iterations, fresh=fresh, progress=progress)
    state.out_dir.mkdir(parents=True, exist_ok=True)
    for name, step in STEPS:
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

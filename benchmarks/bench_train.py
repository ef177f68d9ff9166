"""Training and evaluation throughput of the ``tiny`` preset on CPU.

Three ways to run the same training steps — eager fp32, bf16 autocast, torch.compile —
each through ``qlab.train.train`` on the embedded corpus, reported as tokens/s and as
ratios to eager. Training time excludes validation, and compile's warm-up steps are run
and discarded before timing starts (``warmup_steps``), so the compile figure is steady
state; its one-off compile time is reported separately. Inductor's C++ compilation of
both loop modes takes minutes on a 2-core CPU, so the compile run is opt-in:
``QLAB_BENCH_COMPILE=1 python -m benchmarks bench_train``. Evaluation throughput is
``evaluate_bpb`` on the trained model.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.record import Record
from qlab.train.config import resolve_configs
from qlab.train.trainer import train

ITERATIONS = 6
THREADS = 1  # single-thread throughput: reproducible, and not skewed by a busy machine
EVAL_TOKENS = 32 * 256 + 1


def _run(mode: str, out: Path) -> tuple[float, float]:
    """(steady-state training tokens/s, total seconds of the train() call)."""
    overrides = {
        "iterations": ITERATIONS,
        "out_dir": str(out / mode),
        "device": "cpu",
        "val_every": 0,
        "val_max_tokens": 2 * 256 + 1,
        "checkpoint_every": 0,
        "autocast": "bf16" if mode == "bf16" else "none",
        "compile": mode == "compile",
        "warmup_steps": 2 if mode == "compile" else 1,  # compile both loop modes before timing
    }
    cfg, model_cfg = resolve_configs("tiny", overrides, {}, env={})
    t0 = time.perf_counter()
    result = train(cfg, model_cfg, progress=False)
    return result.tokens_per_second, time.perf_counter() - t0


def _eval_tokens_per_s(run_dir: Path) -> float:
    from qlab.data import build_byte_tables, default_dataset, load_tokenizer, load_validation_tokens
    from qlab.eval.bpb import evaluate_bpb
    from qlab.loaders import load_model

    model, mc = load_model(run_dir)
    info = default_dataset(vocab_size=mc.vocab_size)
    tokens = load_validation_tokens(info.val_files, mc.train_seq_len)
    tables = build_byte_tables(load_tokenizer(info.tokenizer_path), mc.vocab_size)
    n = min(EVAL_TOKENS, tokens.numel())
    evaluate_bpb(model, tokens, tables, seq_len=mc.train_seq_len, batch_seqs=8, max_tokens=2 * 256 + 1)
    t0 = time.perf_counter()
    r = evaluate_bpb(model, tokens, tables, seq_len=mc.train_seq_len, batch_seqs=8, max_tokens=n)
    return r.tokens / (time.perf_counter() - t0)


def run() -> list[Record]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> list[Record]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        eager, eager_s = _run("eager", out)
        bf16, _ = _run("bf16", out)
        compiled, compiled_s, compile_note = float("nan"), float("nan"), "skipped: set QLAB_BENCH_COMPILE=1"
        try:
            if os.environ.get("QLAB_BENCH_COMPILE") == "1":
                compiled, compiled_s = _run("compile", out)
                compile_note = ""
        except Exception as exc:  # no C++ toolchain, unsupported op, …: report, don't crash the suite
            compiled, compiled_s, compile_note = float("nan"), float("nan"), f"compile failed: {exc!s:.80}"
        eval_tps = _eval_tokens_per_s(out / "eager")
    note = f"tiny preset, CPU, {THREADS} thread(s), {ITERATIONS} steps of 4096 tokens"
    return [
        Record("train_tiny_cpu", "eager tokens/s", eager, "tokens/s", notes=note),
        Record(
            "train_tiny_cpu",
            "bf16 autocast / eager",
            bf16 / eager,
            "x",
            baseline="eager fp32",
            notes=f"{bf16:,.0f} tokens/s",
        ),  # fmt: skip
        Record(
            "train_tiny_cpu",
            "torch.compile / eager (steady state)",
            compiled / eager,
            "x",
            baseline="eager fp32",
            notes=compile_note or f"{compiled:,.0f} tokens/s",
        ),  # fmt: skip
        Record(
            "train_tiny_cpu",
            "torch.compile extra wall time",
            compiled_s - eager_s,
            "s",
            baseline="eager run",
            notes="compile + warm-up, paid once per process",
        ),  # fmt: skip
        Record(
            "eval_tiny_cpu", "evaluate_bpb tokens/s", eval_tps, "tokens/s", notes=f"{EVAL_TOKENS - 1} tokens"
        ),
    ]

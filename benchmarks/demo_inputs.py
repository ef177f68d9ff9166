"""The demo checkpoint's evaluation inputs, shared by the benchmarks that measure on it.

``make demo`` writes ``runs/demo`` (``QLAB_BENCH_DEMO_DIR`` moves it); :func:`demo_inputs`
loads its model, dataset, validation tokens, byte tables and — for a policy — the
Hessians of 64 calibration batches, as ``qlab marginal`` and ``qlab quantize`` would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEMO = Path(os.environ.get("QLAB_BENCH_DEMO_DIR", "runs/demo"))


def demo_available() -> bool:
    return (DEMO / "runs" / "tiny" / "model.safetensors").is_file()


def demo_inputs(policy: Any, calib_batches: int = 64) -> dict[str, Any]:
    """{model, config, data, hessians, val, tables} of the demo checkpoint under ``policy``."""
    from qlab.eval.pipeline import resolve_dataset, resolve_model, validation_inputs
    from qlab.quant.model_quant import calibration_batches, model_hessians

    model, _ = resolve_model(DEMO / "runs" / "tiny")
    cfg = model.config
    data = resolve_dataset(DEMO / "data" / f"embedded_sp{cfg.vocab_size}", cfg.vocab_size)
    batches = calibration_batches(data, calib_batches, seq_len=cfg.train_seq_len, batch_seqs=8)
    val, tables = validation_inputs(data, cfg.eval_seq_len, cfg.vocab_size)
    return {"model": model, "config": cfg, "data": data, "hessians": model_hessians(model, policy, batches),
            "val": val, "tables": tables}  # fmt: skip

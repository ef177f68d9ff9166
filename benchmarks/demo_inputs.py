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
    from qlab.eval.context import EvalContext
    from qlab.io.checkpoint import read_config

    run = DEMO / "runs" / "tiny"
    ctx = EvalContext.open(run, DEMO / "data" / f"embedded_sp{read_config(run)['model']['vocab_size']}")
    val, tables = ctx.validation()
    return {"model": ctx.model, "config": ctx.config, "data": ctx.data, "val": val, "tables": tables,
            "hessians": ctx.hessians(policy, calib_batches)}  # fmt: skip

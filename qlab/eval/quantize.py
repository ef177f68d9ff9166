"""``quantize_checkpoint``: a checkpoint in, a calibrated, quantized, evaluated artifact out.

What ``qlab quantize`` does, as one library call the CLI, the demo and notebooks share:
resolve the model and dataset, collect the policy's GPTQ Hessians on training batches,
optionally solve the matrices' clip width k so artifact + code fits the cap, then
:func:`~qlab.eval.pipeline.run_pipeline` (quantize, encode the real container, evaluate
pre-quant → quantized → sliding window) and the per-tensor byte table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from qlab.compress.budget import CAP, budget_table
from qlab.compress.container import SYMBOL_CODEC
from qlab.compress.solver import SolverResult, solve_k
from qlab.eval.context import EvalContext
from qlab.eval.pipeline import run_pipeline
from qlab.io.atomic import atomic_write_bytes
from qlab.quant.model_quant import QuantizedModel, model_extra
from qlab.quant.policy import Policy, resolve_policy

__all__ = ["QuantizeResult", "quantize_checkpoint"]


@dataclass
class QuantizeResult:
    """Everything one quantization produced; plain data, nothing written yet."""

    row: pd.DataFrame  # the pipeline row: stage bpbs, deltas, artifact bytes, timings
    artifact: bytes  # the .qlab file
    budget: pd.DataFrame  # per-tensor bytes (measured with the symbol coder or on request, else predicted)
    policy: Policy  # as applied (k solved when asked)
    quantized: QuantizedModel
    solved: SolverResult | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact atomically (the caller checks it overwrites nothing it should not)."""
        return atomic_write_bytes(path, self.artifact)


def quantize_checkpoint(
    ckpt: nn.Module | str | os.PathLike,
    policy: str | os.PathLike | Policy | Any = "record",
    data: Any = "embedded",
    *,
    preset: str | None = None,
    calib_batches: int = 64,
    calib_batch_seqs: int = 8,
    solve_cap: bool = False,
    cap: int = CAP,
    k_range: tuple[float, float] = (4.0, 40.0),
    k_tol: float = 0.01,
    codec: str = "brotli-11",
    code_bytes: int = 0,
    seq_len: int | None = None,
    stride: int | None = 64,
    max_eval_tokens: int | None = None,
    measure_budget: bool | None = None,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize ``ckpt`` by ``policy`` and evaluate it on ``data``'s validation split.

    ``calib_batches`` = 0 skips calibration (GPTQ tensors fall back to RTN).
    ``solve_cap``: solve the matrices' k for ``cap`` first (:func:`qlab.compress.solver.solve_k`).
    ``measure_budget``: compress each tensor for the byte table (default: only with the
    symbol coder, which is fast enough; brotli-11 sizes are predicted).
    """
    ctx = EvalContext.open(ckpt, data, seq_len, preset=preset)
    pol = resolve_policy(policy)
    calib = dict(n_batches=calib_batches, batch_seqs=calib_batch_seqs)
    hessians = ctx.hessians(pol, **calib, progress=progress) if calib_batches else None
    extra = {"source": ctx.label}
    solved = None
    if solve_cap:
        sd = {k: v.detach() for k, v in ctx.model.state_dict().items()}
        lo, hi = k_range
        head = model_extra(ctx.model, None, **extra)
        solved = solve_k(sd, pol, cap, k_range=(lo, hi), tol=k_tol, hessians=hessians, code_bytes=code_bytes,
                         codec=codec, extra=head, progress=progress)  # fmt: skip
        pol = solved.policy  # a new k, the same GPTQ tensors: the Hessians still apply
    res = run_pipeline(ctx, pol, calib_batches=calib_batches, hessians=hessians, stride=stride,
                       max_eval_tokens=max_eval_tokens, codec=codec, code_bytes=code_bytes, cap=cap,
                       extra=extra, progress=progress)  # fmt: skip
    qm = res.quantized
    head = model_extra(qm.dequantized_model, qm.meta["aliases"], **extra)
    measured = codec == SYMBOL_CODEC if measure_budget is None else measure_budget
    budget = budget_table(qm.quantized_state, codec=codec, predicted=not measured, code=code_bytes, cap=cap,
                          policy=pol.to_dict(), extra=head)  # fmt: skip
    return QuantizeResult(res.row, res.artifact, budget, pol, qm, solved)

"""What one matrix cell measures on its trained model.

* **Pipeline, per weight policy**: :func:`qlab.eval.pipeline.run_pipeline`, exactly what
  ``qlab quantize`` runs — pre-quant bpb (the saved EMA weights), GPTQ calibrated on
  ``⌈calibration_seqs / 8⌉`` batches of 8 training sequences from the shuffled loader (none:
  RTN), quantized bpb, sliding-window bpb (if ``eval.sliding_stride``), score-first TTT bpb
  (if ``eval.ttt``), and the real artifact bytes (the ``.qlab`` container, brotli-11) with
  their prediction. A cell and ``qlab quantize`` with the same settings report the same
  bytes and bpb (tested).
* **Hidden states, per PR #2011 scheme**: the float model's final hidden states (output of
  the final norm) on a fixed batch of ``hidden_tokens`` validation tokens — 128 × d as in
  the paper — quantized by each scheme (:func:`qlab.analysis.hidden_quant.hidden_quant_table`),
  plus the geometry of the unquantized states (:func:`qlab.analysis.geometry.hidden_state_metrics`).

Every cell of a grid sees the same validation tokens (same base data), so the hidden
batch is the same token sequence for every variant and seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qlab.analysis.geometry import hidden_state_metrics
from qlab.analysis.hidden_quant import hidden_quant_table
from qlab.analysis.matrix.spec import EvalSpec
from qlab.errors import DataError
from qlab.eval.bpb import resolve_autocast
from qlab.eval.context import EvalContext
from qlab.eval.pipeline import run_pipeline
from qlab.eval.ttt import TTTConfig
from qlab.model.modes import final_hidden

__all__ = ["cell_autocast", "hidden_batch", "measure_hidden", "measure_pipeline"]

CALIBRATION_BATCH = 8  # sequences per Hessian-collection forward pass


def hidden_batch(tokens: torch.Tensor, seq_len: int, n_tokens: int, offset: int = 0) -> torch.Tensor:
    """(n_seq, L) token ids whose flattened first ``n_tokens`` positions form the hidden batch.

    L = min(seq_len, n_tokens), n_seq = ⌈n_tokens / L⌉: the batch never exceeds the
    model's training length.
    """
    length = min(seq_len, n_tokens)
    n_seq = math.ceil(n_tokens / length)
    need = n_seq * length
    if offset < 0 or tokens.numel() < offset + need:
        raise DataError(
            f"hidden batch: need {need} validation tokens from offset {offset}, have {tokens.numel()}"
        )
    return tokens[offset : offset + need].to(torch.int64).view(n_seq, length)


@torch.no_grad()
def _final_hidden(model: nn.Module, idx: torch.Tensor, n_tokens: int, device: torch.device) -> torch.Tensor:
    model.eval()
    h = final_hidden(model, idx.to(device)).float()
    return h.reshape(-1, h.shape[-1])[:n_tokens].cpu()


def cell_autocast(ctx: EvalContext) -> str | None:
    """A cell evaluates as the records do: bf16 autocast on CUDA, none on CPU."""
    return resolve_autocast("auto", ctx.device)


def measure_hidden(ctx: EvalContext, spec: EvalSpec) -> tuple[list[dict], dict[str, float]]:
    """(one row per hidden-state scheme, geometry of the float hidden states)."""
    idx = hidden_batch(ctx.val_tokens, ctx.seq_len, spec.hidden_tokens, spec.hidden_offset)
    h = _final_hidden(ctx.model, idx, spec.hidden_tokens, ctx.device)
    if not bool(torch.isfinite(h).all()):
        raise DataError("matrix cell: the trained model's final hidden states contain NaN/Inf")
    table = hidden_quant_table(h, spec.hidden_schemes)
    return table.to_dict("records"), hidden_state_metrics(h)


def _ttt_config(ctx: EvalContext, spec: EvalSpec) -> TTTConfig:
    return TTTConfig(
        **{
            "score_batch_seqs": spec.batch_seqs,
            **dict(spec.ttt or {}),
            "seq_len": ctx.seq_len,
            "stride": spec.sliding_stride,
            "max_tokens": spec.val_max_tokens or None,
            "autocast": cell_autocast(ctx),
        }
    )


def measure_pipeline(
    ctx: EvalContext,
    spec: EvalSpec,
    policies: dict[str, Any],
    *,
    source: str | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per weight policy: policy, stage bpbs (NaN when a stage is off), artifact bytes.

    ``source`` is the checkpoint's name kept in the artifact header, as ``qlab quantize``
    keeps its argument. The context scores the float model and collects the Hessians once
    for all policies."""
    calib = math.ceil(spec.calibration_seqs / CALIBRATION_BATCH) if spec.calibration_seqs else 0
    ttt = _ttt_config(ctx, spec) if spec.ttt is not None else None
    rows = []
    for name, policy in policies.items():
        res = run_pipeline(
            ctx, policy, calib_batches=calib, calib_batch_seqs=CALIBRATION_BATCH,
            stride=spec.sliding_stride or None, max_eval_tokens=spec.val_max_tokens or None, ttt=ttt,
            eval_batch_seqs=spec.batch_seqs, autocast=cell_autocast(ctx), agreement=False,
            extra={"source": source} if source else None, progress=progress,
        )  # fmt: skip
        r = res.row.iloc[0]
        row = {"policy": name, **{k: float(r[k]) for k in _STAGE_COLUMNS}}
        rows.append(
            row | {"artifact_bytes": int(r["artifact_bytes"]), "predicted_bytes": int(r["predicted_bytes"])}
        )
    return rows


_STAGE_COLUMNS = ("pre_quant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb")

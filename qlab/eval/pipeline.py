"""The evaluation pipeline of the records as one DataFrame row per checkpoint + policy.

Stages (PAPERS.md §4): pre-quantization → quantized (calibration + GPTQ by the policy,
then standard windows) → quantized sliding window (``stride``) → optionally score-first
TTT on the quantized model. Column names follow
:func:`qlab.analysis.papers.pipeline_attribution` where they overlap, with the same sign
convention (quant tax = quantized − pre-quant; sliding gain = sliding − quantized; TTT
gain = TTT − sliding, or − quantized without a sliding stage; all in mBPB, negative =
better), so qlab's rows and the paper's concatenate. The row also carries the artifact
size (real compressed blob + code bytes), its prediction, whether it fits the cap, and
wall times per stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from qlab.compress.budget import CAP, predict_artifact_bytes
from qlab.compress.container import encode_artifact
from qlab.errors import ConfigError
from qlab.eval.bpb import evaluate_bpb
from qlab.eval.context import EvalContext
from qlab.eval.stages import ATTRIBUTION_COLUMNS, STAGES, attribute_stages
from qlab.eval.ttt import TTTConfig, score_first_ttt
from qlab.quant.model_quant import QuantizedModel, model_extra, quantize_model
from qlab.quant.policy import Policy, resolve_policy

# The quantized model against the float one, token by token (qlab.eval.agreement): KL in
# bits per byte, top-1 agreement, and the quant tax's 95 % interval over documents.
AGREEMENT_COLUMNS = ["kl_bpb", "kl_bpb_lo", "kl_bpb_hi", "top1", "top1_lo", "top1_hi", "quant_tax_lo_mbpb",
                     "quant_tax_hi_mbpb"]  # fmt: skip

COLUMNS = [
    "source",
    "variant",
    "checkpoint",
    "policy",
    *(c for c in ATTRIBUTION_COLUMNS if c != "prequant_ttt_bpb"),  # no pre-quant TTT stage here
    *AGREEMENT_COLUMNS,
    "pre_quant_loss",
    "quantized_loss",
    "eval_tokens",
    "calib_batches",
    "hessians_used",
    "artifact_bytes",
    "predicted_bytes",
    "code_bytes",
    "fits_cap",
    "headroom_bytes",
    "time_calib_quant_s",
    "time_pre_quant_s",
    "time_quantized_s",
    "time_sliding_s",
    "time_ttt_s",
    "time_compress_s",
]


@dataclass
class PipelineResult:
    """The row plus what produced it (the CLI writes ``artifact`` to disk)."""

    row: pd.DataFrame
    quantized: QuantizedModel
    artifact: bytes
    policy: Policy


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def run_pipeline(
    model_or_ckpt: EvalContext | nn.Module | str | os.PathLike,
    policy: Policy | str | os.PathLike | Mapping,
    dataset: Any = None,
    *,
    calib_batches: int = 64,
    calib_batch_seqs: int = 8,
    seq_len: int | None = None,
    stride: int | None = 64,
    max_eval_tokens: int | None = None,
    ttt: Any = None,
    codec: str = "brotli-11",
    code_bytes: int = 0,
    cap: int = CAP,
    hessians: dict | None = None,
    extra: dict | None = None,
    eval_batch_seqs: int = 8,
    autocast: str | None = None,
    agreement: bool = True,
    progress: bool = False,
) -> PipelineResult:
    """Run every stage and return the row, the quantized model and the artifact bytes.

    The one quantize→evaluate path: ``qlab quantize``, the demo and every matrix cell
    call it, so ``artifact_bytes`` (the real container + ``code_bytes``) and the stage bpbs
    mean the same everywhere. Pass an :class:`EvalContext` (then ``dataset`` and
    ``seq_len`` are the context's) to run several policies on one model: the float model
    is scored once and the Hessians collected once. Evaluation runs on the model's device,
    with ``autocast`` (e.g. ``"bf16"`` on CUDA) and ``eval_batch_seqs`` sequences per
    forward pass. ``agreement`` adds the quantized model's KL and top-1 agreement with
    the float model and the quant tax's interval (one more pass of both models)."""
    if isinstance(model_or_ckpt, EvalContext):
        if dataset is not None or seq_len is not None:
            raise ConfigError("pipeline: an EvalContext brings its own dataset and seq_len")
        ctx = model_or_ckpt
    else:
        ctx = EvalContext.open(model_or_ckpt, dataset, seq_len)
    policy = resolve_policy(policy)
    model, seq_len = ctx.model, ctx.seq_len
    val, tables = ctx.validation()
    ev = dict(max_tokens=max_eval_tokens, batch_seqs=eval_batch_seqs, autocast=autocast, progress=progress)
    pre, t_pre = _timed(ctx.evaluate, **ev)
    t0 = time.perf_counter()
    if hessians is None and calib_batches:
        hessians = ctx.hessians(policy, calib_batches, calib_batch_seqs, progress=progress)
    qm = quantize_model(model, policy, hessians=hessians, progress=progress)
    t_quant = time.perf_counter() - t0
    ev["seq_len"] = seq_len
    if hessians is not None:
        qm.meta["calib_batches"] = calib_batches  # the batches the given Hessians came from
    quant, t_q = _timed(evaluate_bpb, qm.dequantized_model, val, tables, **ev)
    agree = (
        ctx.agreement(qm.dequantized_model, max_tokens=max_eval_tokens, batch_seqs=eval_batch_seqs)
        if agreement
        else None
    )
    slide, t_s = (None, 0.0)
    if stride is not None:
        slide, t_s = _timed(evaluate_bpb, qm.dequantized_model, val, tables, stride=stride, **ev)
    ttt_res, t_ttt = (None, 0.0)
    if ttt is not None:
        ttt_res, t_ttt = _timed(
            _run_ttt, qm.dequantized_model, val, tables, ttt, seq_len, stride, max_eval_tokens, progress
        )
    head = model_extra(qm.dequantized_model, qm.meta["aliases"], **(extra or {}))
    t0 = time.perf_counter()
    blob = encode_artifact(qm.quantized_state, policy=policy.to_dict(), codec=codec, extra=head)
    t_c = time.perf_counter() - t0
    predicted = predict_artifact_bytes(qm.quantized_state, policy=policy.to_dict(), extra=head)
    stages = dict(pre=pre, quant=quant, slide=slide, ttt=ttt_res, agreement=agree)
    times = dict(calib_quant=t_quant, pre_quant=t_pre, quantized=t_q, sliding=t_s, ttt=t_ttt, compress=t_c)
    sizes = dict(artifact=len(blob) + code_bytes, predicted=predicted + code_bytes, code=code_bytes, cap=cap)
    row = _row(ctx.label, policy.name, stages, qm, sizes, times)
    return PipelineResult(row, qm, blob, policy)


def _run_ttt(model, val, tables, ttt, seq_len: int, stride: int | None, max_tokens, progress: bool):
    cfg = TTTConfig(seq_len=seq_len, stride=stride) if ttt is True else ttt
    if not isinstance(cfg, TTTConfig):
        raise ConfigError(f"pipeline: ttt must be None, True or a TTTConfig, got {type(ttt).__name__}")
    if cfg.max_tokens is None and max_tokens is not None:
        cfg = dataclasses.replace(cfg, max_tokens=max_tokens)  # score the same tokens as the other stages
    return score_first_ttt(model, val, tables, cfg, progress=progress)


def _row(label: str, policy: str, stages: dict, qm: QuantizedModel, sizes: dict, times: dict) -> pd.DataFrame:
    def bpb(r) -> float:
        return float(r.val_bpb) if r is not None else math.nan

    pre, quant, slide, ttt = (bpb(stages[k]) for k in ("pre", "quant", "slide", "ttt"))
    by = {STAGES[0]: pre, "quantized": quant, "quantized_sliding_window": slide, "legal_ttt": ttt}
    row = {
        "source": "qlab",
        "variant": f"{Path(label).name}:{policy}",
        "checkpoint": label,
        "policy": policy,
        **attribute_stages({k: v for k, v in by.items() if not math.isnan(v)}),
        **_agreement_fields(stages["agreement"]),
        "pre_quant_loss": float(stages["pre"].val_loss),
        "quantized_loss": float(stages["quant"].val_loss),
        "eval_tokens": int(stages["quant"].tokens),
        "calib_batches": int(qm.meta["calib_batches"]),
        "hessians_used": bool(qm.hessians_used),
        "artifact_bytes": int(sizes["artifact"]),
        "predicted_bytes": int(sizes["predicted"]),
        "code_bytes": int(sizes["code"]),
        "fits_cap": bool(sizes["artifact"] <= sizes["cap"]),
        "headroom_bytes": int(sizes["cap"] - sizes["artifact"]),
        **{f"time_{k}_s": float(v) for k, v in times.items()},
    }
    return pd.DataFrame([row], columns=COLUMNS)


def _agreement_fields(s: dict[str, float] | None) -> dict[str, float]:
    if s is None:
        return dict.fromkeys(AGREEMENT_COLUMNS, math.nan)
    fields = {k: s[k] for k in ("kl_bpb", "kl_bpb_lo", "kl_bpb_hi", "top1", "top1_lo", "top1_hi")}
    return fields | {
        "quant_tax_lo_mbpb": 1e3 * s["delta_bpb_lo"],
        "quant_tax_hi_mbpb": 1e3 * s["delta_bpb_hi"],
    }


def pipeline_row(
    model_or_ckpt: EvalContext | nn.Module | str | os.PathLike,
    policy: Policy | str | os.PathLike | Mapping,
    dataset: Any = None,
    *,
    calib_batches: int = 64,
    seq_len: int | None = None,
    stride: int | None = 64,
    max_eval_tokens: int | None = None,
    ttt: Any = None,
    progress: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """One row: pre-quant → quantized → sliding (→ TTT) bpb, deltas, artifact bytes, timings.

    ``dataset``: a DatasetInfo, a directory or ``"embedded"``. ``ttt``: None, True (the
    record's TTT settings at this seq_len/stride) or a :class:`qlab.eval.ttt.TTTConfig`.
    Other keywords (codec, code_bytes, cap, calib_batch_seqs, hessians) go to
    :func:`run_pipeline`.
    """
    return run_pipeline(
        model_or_ckpt,
        policy,
        dataset,
        calib_batches=calib_batches,
        seq_len=seq_len,
        stride=stride,
        max_eval_tokens=max_eval_tokens,
        ttt=ttt,
        progress=progress,
        **kwargs,
    ).row

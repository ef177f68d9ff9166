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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from qlab.compress.budget import CAP, predict_artifact_bytes
from qlab.compress.container import encode_artifact
from qlab.data import build_byte_tables, default_dataset, load_tokenizer, load_validation_tokens, open_dataset
from qlab.errors import ConfigError
from qlab.eval.bpb import evaluate_bpb
from qlab.eval.stages import ATTRIBUTION_COLUMNS, STAGES, attribute_stages
from qlab.eval.ttt import TTTConfig, score_first_ttt
from qlab.io.checkpoint import load_weights
from qlab.loaders import load_model, load_quantized
from qlab.loaders.readers import detect_format, load_state_dict
from qlab.model.gpt import GPT
from qlab.model.infer import infer_model_config
from qlab.quant.model_quant import QuantizedModel, calibration_batches, model_extra, quantize_model
from qlab.quant.policy import Policy, get_policy

COLUMNS = [
    "source",
    "variant",
    "checkpoint",
    "policy",
    *(c for c in ATTRIBUTION_COLUMNS if c != "prequant_ttt_bpb"),  # no pre-quant TTT stage here
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
    pre_quant: Any = None  # the float model's EvalResult (reusable on the same tokens)


def resolve_model(
    model_or_ckpt: nn.Module | str | os.PathLike, preset: str | None = None
) -> tuple[nn.Module, str]:
    """A model and a label: a module as is, a qlab run directory via ``load_model`` (with
    its depth-recurrence mode restored), a qlab artifact via its header's model config, or
    any other checkpoint of qlab's GPT (the record's ``final_model.pt`` and ``.int6.ptz``,
    safetensors) with its configuration inferred from the shapes, defaults from ``preset``
    (``record`` when None)."""
    if isinstance(model_or_ckpt, nn.Module):
        return model_or_ckpt, type(model_or_ckpt).__name__
    path = Path(model_or_ckpt)
    fmt = detect_format(path)
    if fmt == "qlab-run":
        model, _ = load_model(path)
        return model, str(path)
    if fmt == "qlab-artifact":
        return load_quantized(path).model, str(path)
    state = load_state_dict(path)
    config = infer_model_config({k: tuple(v.shape) for k, v in state.items()}, preset or "record", str(path))
    model = GPT(config)
    load_weights(model, {k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, str(path))
    # A state dict does not say whether depth recurrence was on: the records' final
    # weights were trained with it switched on for the second half, so it is on here.
    if config.loop_layers is not None:
        model.set_looping(True)
    return model, f"{path} (config inferred from shapes, preset {preset or 'record'})"


def resolve_dataset(dataset: Any, vocab_size: int) -> Any:
    """A DatasetInfo from a DatasetInfo, a directory, or ``"embedded"`` (built once, cached)."""

    if hasattr(dataset, "val_files"):
        return dataset
    if dataset is None or str(dataset) == "embedded":
        return default_dataset(vocab_size=vocab_size)
    return open_dataset(dataset)


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def validation_inputs(
    data: Any, seq_len: int, vocab_size: int | None = None, tokenizer_path: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """(validation tokens, byte tables) of a dataset for a model of ``vocab_size`` (default:
    the dataset's), with its tokenizer or ``tokenizer_path``: what every bpb evaluation
    needs besides the model. The one place qlab assembles them (trainer, pipeline, demo,
    CLI, matrix cells, figures)."""
    val = load_validation_tokens(data.val_files, seq_len, vocab_size=data.vocab_size)
    sp = load_tokenizer(tokenizer_path or data.tokenizer_path)
    return val, build_byte_tables(sp, vocab_size or data.vocab_size)


def run_pipeline(
    model_or_ckpt: nn.Module | str | os.PathLike,
    policy: Policy | str,
    dataset: Any,
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
    pre_quant: Any = None,
    extra: dict | None = None,
    eval_batch_seqs: int = 8,
    autocast: str | None = None,
    progress: bool = False,
) -> PipelineResult:
    """Run every stage and return the row, the quantized model and the artifact bytes.

    The one quantize→evaluate path: ``qlab quantize``, the demo and every matrix cell
    call it, so ``artifact_bytes`` (the real container + ``code_bytes``) and the stage bpbs
    mean the same everywhere. ``pre_quant`` (an earlier ``evaluate_bpb`` result of this
    model on the same tokens and settings) skips re-scoring the float model, as a matrix
    cell does for its second policy. Evaluation runs on the model's device, with ``autocast``
    (e.g. ``"bf16"`` on CUDA) and ``eval_batch_seqs`` sequences per forward pass."""
    model, label = resolve_model(model_or_ckpt)
    policy = get_policy(policy) if isinstance(policy, str) else policy
    vocab = model.config.vocab_size if hasattr(model, "config") else None
    data = resolve_dataset(dataset, vocab or 1024)
    seq_len = seq_len or getattr(getattr(model, "config", None), "eval_seq_len", None)
    if not seq_len:
        raise ConfigError("pipeline: seq_len is needed for a model without a config")
    if vocab is not None and data.vocab_size > vocab:
        raise ConfigError(f"dataset vocab {data.vocab_size} exceeds the model's vocab {vocab}")
    val, tables = validation_inputs(data, seq_len, vocab)
    ev = dict(seq_len=seq_len, max_tokens=max_eval_tokens, batch_seqs=eval_batch_seqs, autocast=autocast,
              progress=progress)  # fmt: skip
    pre, t_pre = (pre_quant, 0.0) if pre_quant is not None else _timed(evaluate_bpb, model, val, tables, **ev)
    train_len = getattr(getattr(model, "config", None), "train_seq_len", seq_len)
    batches = None
    if hessians is None and calib_batches:
        batches = calibration_batches(data, calib_batches, seq_len=train_len, batch_seqs=calib_batch_seqs)
        device = next(model.parameters()).device
        batches = [b.to(device) for b in batches]  # the Hessian hooks run where the model is
    qm, t_quant = _timed(quantize_model, model, policy, batches, hessians=hessians, progress=progress)
    if hessians is not None:
        qm.meta["calib_batches"] = calib_batches  # the batches the given Hessians came from
    quant, t_q = _timed(evaluate_bpb, qm.dequantized_model, val, tables, **ev)
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
    stages = dict(pre=pre, quant=quant, slide=slide, ttt=ttt_res)
    times = dict(calib_quant=t_quant, pre_quant=t_pre, quantized=t_q, sliding=t_s, ttt=t_ttt, compress=t_c)
    sizes = dict(artifact=len(blob) + code_bytes, predicted=predicted + code_bytes, code=code_bytes, cap=cap)
    row = _row(label, policy.name, stages, qm, sizes, times)
    return PipelineResult(row, qm, blob, policy, pre)


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


def pipeline_row(
    model_or_ckpt: nn.Module | str | os.PathLike,
    policy: Policy | str,
    dataset: Any,
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

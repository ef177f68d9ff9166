"""What one matrix cell measures on its trained model.

* **Pipeline, per weight policy**: pre-quant bpb (the saved EMA weights), then the model
  with its weights quantized by the policy and dequantized: quantized bpb, sliding-window
  bpb (if ``eval.sliding_stride``), score-first TTT bpb (if ``eval.ttt``), and the
  artifact size predicted by :func:`qlab.compress.predict.predict_compressed_bytes`
  (brotli-11 of the records' serialisation) for the quantized state dict.
* **Hidden states, per PR #2011 scheme**: the float model's final hidden states (output of
  the final norm) on a fixed batch of ``hidden_tokens`` validation tokens — 128 × d as in
  the paper — quantized by each scheme (:func:`qlab.analysis.hidden_quant.hidden_quant_table`),
  plus the geometry of the unquantized states (:func:`qlab.analysis.geometry.hidden_state_metrics`).

Every cell of a grid sees the same validation tokens (same base data), so the hidden
batch is the same token sequence for every variant and seed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlab.analysis.geometry import hidden_state_metrics
from qlab.analysis.hidden_quant import hidden_quant_table
from qlab.analysis.matrix.spec import EvalSpec
from qlab.data.tokenizer import ByteTables
from qlab.errors import DataError

__all__ = ["EvalData", "hidden_batch", "measure_hidden", "measure_pipeline"]

CALIBRATION_BATCH = 8  # sequences per Hessian-collection forward pass


@dataclass
class EvalData:
    """Everything evaluation needs besides the model."""

    val_tokens: torch.Tensor
    byte_tables: ByteTables
    seq_len: int
    device: torch.device
    train_tokens: torch.Tensor | None = None  # for GPTQ calibration (training split only)

    @property
    def autocast(self) -> str | None:
        return "bf16" if self.device.type == "cuda" else None


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
    h = model.final_hidden(idx.to(device)).float()
    return h.reshape(-1, h.shape[-1])[:n_tokens].cpu()


def measure_hidden(model: nn.Module, data: EvalData, spec: EvalSpec) -> tuple[list[dict], dict[str, float]]:
    """(one row per hidden-state scheme, geometry of the float hidden states)."""
    idx = hidden_batch(data.val_tokens, data.seq_len, spec.hidden_tokens, spec.hidden_offset)
    h = _final_hidden(model, idx, spec.hidden_tokens, data.device)
    if not bool(torch.isfinite(h).all()):
        raise DataError("matrix cell: the trained model's final hidden states contain NaN/Inf")
    table = hidden_quant_table(h, spec.hidden_schemes)
    return table.to_dict("records"), hidden_state_metrics(h)


def _bpb(model: nn.Module, data: EvalData, spec: EvalSpec, stride: int | None) -> float:
    from qlab.eval.bpb import evaluate_bpb

    return evaluate_bpb(
        model,
        data.val_tokens,
        data.byte_tables,
        seq_len=data.seq_len,
        batch_seqs=spec.batch_seqs,
        stride=stride,
        device=data.device,
        max_tokens=spec.val_max_tokens or None,
        autocast=data.autocast,
    ).val_bpb


def _ttt_bpb(model: nn.Module, data: EvalData, spec: EvalSpec, progress: bool) -> float:
    from qlab.eval.ttt import TTTConfig, score_first_ttt

    cfg = TTTConfig(
        **{
            "score_batch_seqs": spec.batch_seqs,
            **dict(spec.ttt or {}),
            "seq_len": data.seq_len,
            "stride": spec.sliding_stride,
            "max_tokens": spec.val_max_tokens or None,
            "autocast": data.autocast,
        }
    )
    return score_first_ttt(
        model, data.val_tokens, data.byte_tables, cfg, device=data.device, progress=progress
    ).val_bpb


def _hessians(model: nn.Module, data: EvalData, n_seqs: int) -> dict[str, torch.Tensor]:
    from qlab.quant.hessian import collect_hessians

    if n_seqs == 0:
        return {}
    if data.train_tokens is None or data.train_tokens.numel() < n_seqs * data.seq_len:
        raise DataError(f"GPTQ calibration needs {n_seqs} × {data.seq_len} training tokens")
    x = data.train_tokens[: n_seqs * data.seq_len].to(torch.int64).view(n_seqs, data.seq_len)
    batches = [b.to(data.device) for b in x.split(CALIBRATION_BATCH)]
    model.eval()
    return collect_hessians(model, batches, min_numel=0)


def quantized_model(model: nn.Module, policy, hessians: dict[str, torch.Tensor]) -> tuple[nn.Module, Any]:
    """(a copy of ``model`` holding the policy's dequantized weights, the quantized state dict)."""
    from qlab.quant.policy import dequantize_state_dict, quantize_state_dict

    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    qsd = quantize_state_dict(state, policy, hessians={k: v.cpu() for k, v in hessians.items()})
    deq = dequantize_state_dict(qsd, torch.float32)
    work = copy.deepcopy(model)
    device = next(model.parameters()).device
    work.load_state_dict({k: v.to(device) for k, v in deq.items()})
    return work, qsd


def measure_pipeline(
    model: nn.Module, data: EvalData, spec: EvalSpec, policies: dict[str, Any], progress: bool = False
) -> list[dict]:
    """One row per weight policy: policy, stage bpbs (NaN when a stage is off), artifact bytes."""
    from qlab.compress.predict import predict_compressed_bytes

    pre = _bpb(model, data, spec, None)
    hessians = _hessians(model, data, spec.calibration_seqs)
    rows = []
    for name, policy in policies.items():
        qmodel, qsd = quantized_model(model, policy, hessians)
        row = {"policy": name, "pre_quant_bpb": pre, "quantized_bpb": _bpb(qmodel, data, spec, None)}
        row["sliding_bpb"] = (
            _bpb(qmodel, data, spec, spec.sliding_stride) if spec.sliding_stride else math.nan
        )
        row["ttt_bpb"] = _ttt_bpb(qmodel, data, spec, progress) if spec.ttt is not None else math.nan
        row["artifact_bytes"] = predict_compressed_bytes(qsd)
        rows.append(row)
    return rows

"""Quantize a whole model: calibration batches → Hessians → policy (GPTQ) → dequantized copy.

The record's recipe (PAPERS.md §3): Hessians H = XᵀX of every GPTQ-quantized linear's
inputs (the tied embedding gets the final norm's output), averaged over calibration
batches of *training* data (64 in the record), then GPTQ per the policy. Here the
Hessian hooks are placed on exactly the tensors the policy sends to GPTQ, so a policy
with small ``min_numel`` thresholds (tests, tiny models) still gets real GPTQ.

The dequantized model is a deep copy of the input with the dequantized weights loaded,
so parameter sharing (tied weights) and the depth-recurrence mode carry over. Tensors
that alias an earlier state-dict entry are stored once and restored from it.

Artifacts: :func:`save_quantized` writes a qlab container whose ``extra`` header holds the
model config, so :func:`load_quantized` rebuilds the model from the file alone;
:func:`qlab.compress.ptz.ptz_tree` gives the Parameter Golf ``{"w", "m"}`` tree for ``.ptz`` export.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlab.data.loader import ShuffledSequenceLoader
from qlab.errors import DataError, QuantError
from qlab.io.checkpoint import load_weights
from qlab.model.modes import eval_mode
from qlab.quant.hessian import collect_hessians
from qlab.quant.policy import Passthrough, Policy, dequantize_state_dict, quantize_state_dict
from qlab.quant.tensor import QuantizedTensor

ARTIFACT_KIND = "qlab-quantized-model"


@dataclass
class QuantizedModel:
    """Result of :func:`quantize_model`.

    quantized_state: name → QuantizedTensor / Passthrough (what the artifact stores);
    dequantized_model: a copy of the model carrying the dequantized weights;
    hessians_used: whether any tensor was quantized by GPTQ with a Hessian;
    meta: policy name, calibration batches, GPTQ / RTN-fallback tensor names, aliases, timings.
    """

    quantized_state: dict[str, QuantizedTensor | Passthrough]
    dequantized_model: nn.Module
    hessians_used: bool
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- calibration


def calibration_batches(
    dataset: Any,
    n_batches: int = 64,
    *,
    seq_len: int,
    batch_seqs: int = 8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``n_batches`` input batches (B = ``batch_seqs``, T = ``seq_len``) of the dataset's
    training shards, deterministic in ``seed`` (the records calibrate on training data)."""

    if not isinstance(n_batches, int) or n_batches < 1:
        raise DataError(f"calibration needs a positive number of batches, got {n_batches!r}")
    files = getattr(dataset, "train_files", None)
    if not files:
        raise DataError(f"{getattr(dataset, 'root', dataset)}: no training shards for calibration")
    loader = ShuffledSequenceLoader(files, seq_len, seed=seed, vocab_size=dataset.vocab_size)
    return [loader.next_batch(batch_seqs)[0] for _ in range(n_batches)]


def gptq_names(state_dict: Mapping[str, torch.Tensor], policy: Policy) -> list[str]:
    """Tensors the policy sends to GPTQ (they need Hessians)."""
    return [n for n, t in state_dict.items() if policy.spec_for(n, t).method == "gptq"]


def model_hessians(
    model: nn.Module, policy: Policy, batches: Iterable, *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Hessians of exactly the policy's GPTQ tensors (hooks below the policy's size cut)."""

    sd = model.state_dict()
    names = gptq_names(sd, policy)
    if not names:
        return {}
    min_numel = min(sd[n].numel() for n in names) - 1
    with eval_mode(model):
        hessians = collect_hessians(model, batches, min_numel=min_numel, progress=progress)
    return {n: h for n, h in hessians.items() if n in names}


# --------------------------------------------------------------------------- quantize


def _aliases(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{later name: first name} for state-dict entries that share storage (tied weights)."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in sd.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _to_cpu(value: QuantizedTensor | Passthrough) -> QuantizedTensor | Passthrough:
    if isinstance(value, QuantizedTensor):
        return value.to("cpu")
    return Passthrough(
        value.data.cpu(),
        value.kind,
        value.dtype,
        value.shape,
        None if value.scale is None else value.scale.cpu(),
    )


def quantize_model(
    model: nn.Module,
    policy: Policy,
    calib_batches: Iterable | None = None,
    *,
    hessians: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> QuantizedModel:
    """Quantize ``model`` by ``policy``; GPTQ tensors use Hessians from ``calib_batches``.

    Pass precomputed ``hessians`` (e.g. from :func:`model_hessians`) to skip collection.
    Without either, GPTQ tensors fall back to RTN (``meta["rtn_fallback"]`` lists them).
    The input model is not modified.
    """
    t0 = time.perf_counter()
    if hessians is None and calib_batches is not None:
        batches = list(calib_batches)
        hessians = model_hessians(model, policy, batches, progress=progress)
        n_batches = len(batches)
    else:
        n_batches = 0
    t1 = time.perf_counter()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    aliases = _aliases(sd)
    own = {k: v for k, v in sd.items() if k not in aliases}
    qstate = quantize_state_dict(own, policy, hessians or {}, progress=progress)
    qstate = {k: _to_cpu(v) for k, v in qstate.items()}
    t2 = time.perf_counter()
    gptq = [n for n, q in qstate.items() if isinstance(q, QuantizedTensor) and q.meta.get("method") == "gptq"]
    fallback = [n for n, q in qstate.items() if isinstance(q, QuantizedTensor) and "note" in q.meta]
    deq_model = dequantized_copy(model, qstate, aliases)
    meta = {
        "policy": policy.name,
        "calib_batches": n_batches,
        "gptq_tensors": gptq,
        "rtn_fallback": fallback,
        "aliases": aliases,
        "hessian_seconds": t1 - t0,
        "quantize_seconds": t2 - t1,
    }
    return QuantizedModel(qstate, deq_model, bool(gptq), meta)


# --------------------------------------------------------------------------- dequantize / load


def dequantize_entries(entries: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> dict:
    """Plain tensors from quantized-state entries (plain tensors pass), aliases filled in."""
    quant = {k: v for k, v in entries.items() if isinstance(v, (QuantizedTensor, Passthrough))}
    out = dequantize_state_dict(quant)
    for k, v in entries.items():
        if k not in out:
            if not isinstance(v, torch.Tensor):
                raise QuantError(f"tensor {k!r}: cannot dequantize a {type(v).__name__}")
            out[k] = v
    for dup, first in (aliases or {}).items():
        if first not in out:
            raise QuantError(f"tensor {dup!r} aliases {first!r}, which is not in the quantized state")
        out[dup] = out[first]
    return out


def load_dequantized(model: nn.Module, entries: Mapping[str, Any], aliases=None, where: str = "") -> None:
    """Load dequantized ``entries`` into ``model`` in place (strict: names and shapes must match)."""

    state = dequantize_entries(entries, aliases)
    own = model.state_dict()
    state = {k: v.to(device=own[k].device) if k in own else v for k, v in state.items()}
    load_weights(model, state, where or "quantized state")


def dequantized_copy(model: nn.Module, qstate: Mapping[str, Any], aliases=None) -> nn.Module:
    """A deep copy of ``model`` carrying the dequantized weights (ties and modes preserved)."""
    out = copy.deepcopy(model)
    load_dequantized(out, qstate, aliases)
    return out


def model_extra(model: nn.Module, aliases: Mapping[str, str] | None = None, **more: Any) -> dict:
    """The artifact ``extra`` header for a model: its config (if a GPT), loop mode, aliases."""
    extra: dict[str, Any] = {"kind": ARTIFACT_KIND, "aliases": dict(aliases or {}), **more}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        extra["model_config"] = config.to_dict()
        extra["looping"] = bool(getattr(model, "looping", False))
    return extra


# --------------------------------------------------------------------------- .ptz export

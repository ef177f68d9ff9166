"""The top-level functions: ``qlab.load``, ``qlab.entropy``, ``qlab.analyze``,
``qlab.quantize``, ``qlab.sweep`` (and ``qlab.Workspace``), each one call from a notebook.

Thin wrappers over the modules that do the work, taking any checkpoint qlab reads (a
run directory, safetensors, a Hugging Face directory, a torch state dict, ``.ptz`` or
``.qlab``) or an in-memory state dict, and returning plain data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import torch

from qlab.analysis.entropy_report import EntropyReport, entropy_report
from qlab.analysis.rd import DEFAULT_KS
from qlab.analysis.rd import sweep as _sweep
from qlab.analysis.spectra import spectral_summary
from qlab.compress.container import write_artifact
from qlab.loaders.readers import load_state_dict
from qlab.progress import resolve_progress
from qlab.quant.policy import Policy, quantize_state_dict, resolve_policy

Checkpoint = str | os.PathLike | Mapping[str, torch.Tensor]


def _state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return dict(ckpt) if isinstance(ckpt, Mapping) else load_state_dict(ckpt)


def load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by name (a ``.qlab``/``.ptz`` artifact dequantized)."""
    return load_state_dict(path)


def entropy(
    ckpt: Checkpoint,
    policy: str | Policy | Mapping = "record",
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> EntropyReport:
    """Per-tensor entropy and predicted compressed size under ``policy``
    (:func:`qlab.analysis.entropy_report.entropy_report`; ``report.table``, ``report.totals``).
    ``progress=None`` draws a bar in a notebook or terminal only."""
    return entropy_report(ckpt, policy, progress=resolve_progress(progress), **kwargs)


def analyze(ckpt: Checkpoint, **kwargs: Any) -> pd.DataFrame:
    """One row per matrix: family, layer, shape, σ range, stable and effective rank,
    flatness and the WeightWatcher-style power-law α (:func:`qlab.analysis.spectra.spectral_summary`)."""
    return spectral_summary(_state(ckpt), **kwargs)


def quantize(
    ckpt: Checkpoint,
    policy: str | Policy | Mapping = "record",
    *,
    hessians: Mapping[str, torch.Tensor] | None = None,
    out: str | os.PathLike | None = None,
    codec: str = "brotli-11",
    progress: bool | None = None,
) -> dict[str, Any]:
    """The quantized state (name → QuantizedTensor or Passthrough) of a checkpoint under
    ``policy``; GPTQ tensors use ``hessians`` when given, else RTN. With ``out`` the
    artifact is also written (``codec="ans"`` for the symbol coder)."""
    pol = resolve_policy(policy)
    state = quantize_state_dict(_state(ckpt), pol, hessians, progress=resolve_progress(progress))
    if out is not None:
        write_artifact(out, state, policy=pol.to_dict(), codec=codec)
    return state


def sweep(
    ckpt: Checkpoint,
    bits: Iterable[int] = range(2, 9),
    ks: Iterable[float] = DEFAULT_KS,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Rate–distortion sweep: one row per matrix × (bits, rule, k) (:func:`qlab.analysis.rd.sweep`)."""
    return _sweep(ckpt, bits, ks, progress=resolve_progress(progress), **kwargs)

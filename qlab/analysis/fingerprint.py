"""Fingerprint a checkpoint: every spectral and activation analysis as tidy tables.

The analyses live in :mod:`~qlab.analysis.spectra`, :mod:`.cka`, :mod:`.depth`,
:mod:`.geometry` and :mod:`.hidden_quant`; this module runs them on one checkpoint
(plus, optionally, a reference checkpoint and a quantized copy) and returns
``{table name: DataFrame}``. Every table carries a ``variant`` column naming the
checkpoint a row belongs to, so one table can hold the model, its reference and its
quantized copy side by side.

Weight tables (any checkpoint format qlab reads): ``spectral_summary`` (one row per
matrix), ``family_spectra`` (layer-averaged σᵢ/σ₁ per family), ``family_summary``
(flatness, ranks, α per family) and ``spectral_differential`` (Δσ% of a variant against
its ``reference``: the model vs ``against``, the quantized copy vs the model).

Activation tables (a qlab run directory and validation data): ``depth`` (per block
‖h‖, kurtosis, logit-lens bpb), ``hidden_metrics`` (geometry of every block's output and
of the final-norm output), ``cka_layers`` (layer × layer), ``cka_across`` (model layers
× other variant's layers) and, on request, ``sensitivity`` (Δbpb from quantizing one
block). Tables of the "final hidden states" — ``coord_hist``, ``norm_hist``, ``pca3``,
``cka_variants`` (variant × variant) and ``hidden_quant`` (PR #2011's seven schemes on
the first 128 tokens) — use the last block's output, before the final norm (see
:func:`last_block`); their ``layer`` column says which.
:func:`fingerprint` adds ``meta`` (what was measured, how: one row per key).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.analysis.activations import capture_hidden, flatten_tokens
from qlab.analysis.cka import cka_across, cka_matrix
from qlab.analysis.depth import depth_trajectory, layer_sensitivity
from qlab.analysis.geometry import coordinate_histogram, hidden_state_metrics, norm_histogram, pca3
from qlab.analysis.hidden_quant import hidden_quant_table
from qlab.analysis.spectra import (
    family_spectra,
    family_summary,
    spectral_differential,
    spectral_summary,
    weight_family,
)
from qlab.data.tokenizer import token_bytes
from qlab.errors import ConfigError, DataError
from qlab.eval.context import EvalContext, resolve_model
from qlab.io.atomic import atomic_write_text
from qlab.loaders.readers import detect_format, load_state_dict
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import Policy, dequantize_state_dict, quantize_state_dict, resolve_policy
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize

__all__ = [
    "WEIGHT_TABLES",
    "ACTIVATION_TABLES",
    "weight_fingerprint",
    "activation_fingerprint",
    "sensitivity_quantizer",
    "last_block",
    "fingerprint",
    "write_fingerprint",
]

WEIGHT_TABLES = ("spectral_summary", "family_spectra", "family_summary", "spectral_differential")
ACTIVATION_TABLES = (
    "depth",
    "hidden_metrics",
    "coord_hist",
    "norm_hist",
    "pca3",
    "cka_layers",
    "cka_across",
    "cka_variants",
    "hidden_quant",
    "sensitivity",
)
HIDDEN_QUANT_TOKENS = 128  # PR #2011 quantized 128 tokens × 512 final hidden states
FORMATS = ("csv", "json")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

StateDictLike = Mapping[str, torch.Tensor] | str | os.PathLike


# --------------------------------------------------------------------------- helpers
def _tag(df: pd.DataFrame, variant: str, **more: Any) -> pd.DataFrame:
    """``df`` with leading ``variant`` (and any ``more``) columns."""
    df = df.copy()
    for key, value in reversed([("variant", variant), *more.items()]):
        df.insert(0, key, value)
    return df


def _stack(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)


def _state_dict(source: StateDictLike, what: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a mapping or from any checkpoint path qlab reads."""
    if isinstance(source, Mapping):
        if not source:
            raise DataError(f"{what}: the state dict is empty")
        return {k: v.detach() for k, v in source.items() if isinstance(v, torch.Tensor)}
    if isinstance(source, (str, os.PathLike)):
        return load_state_dict(source)
    raise ConfigError(f"{what}: expected a state dict or a checkpoint path, got {type(source).__name__}")


def _quantized_weights(sd: Mapping[str, torch.Tensor], policy: Policy) -> dict[str, torch.Tensor]:
    """Dequantized copy of ``sd`` under ``policy`` (GPTQ tensors fall back to RTN: no Hessians)."""
    return dequantize_state_dict(quantize_state_dict(sd, policy), torch.float32)


def _distinct(labels: Sequence[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ConfigError(f"variant labels must be distinct, got {list(labels)}")


# --------------------------------------------------------------------------- weights
def _by(sd) -> str:
    """Compare spectra by family where names have one, matrix by matrix otherwise."""
    return "family" if any(weight_family(n) for n in sd) else "matrix"


def _if_families(fn, sd, **kw) -> pd.DataFrame:
    """A per-family table, or an empty one for checkpoints whose names have no qlab family
    (e.g. a BERT's ``encoder.layer.0.attention…``): their per-matrix spectra still work."""
    if not any(weight_family(n) for n in sd):
        return pd.DataFrame({"family": pd.Series(dtype=str)})
    return fn(sd, **kw)


def weight_fingerprint(
    path_or_sd: StateDictLike,
    *,
    against: StateDictLike | None = None,
    policy: str | Policy | None = None,
    quantized: Mapping[str, torch.Tensor] | None = None,
    label: str = "model",
    against_label: str = "reference",
    quantized_label: str | None = None,
    fit_alpha: bool = True,
) -> dict[str, pd.DataFrame]:
    """Spectral tables of a checkpoint, its reference ``against`` and its quantized copy.

    ``policy`` quantizes the weights here (RTN wherever the policy asks for GPTQ, as
    there is no calibration data); ``quantized`` passes an already dequantized state dict
    instead (e.g. a GPTQ model). Δσ% rows compare the model with ``against`` and the
    quantized copy with the model; without either the differential table is absent.
    """
    if policy is not None and quantized is not None:
        raise ConfigError("give either policy or an already quantized state dict, not both")
    pol = resolve_policy(policy) if policy is not None else None
    q_label = quantized_label or f"{label} quantized" + (f" ({pol.name})" if pol else "")
    quantizing = pol is not None or quantized is not None
    _distinct([label] + ([against_label] if against is not None else []) + ([q_label] if quantizing else []))
    variants = {label: _state_dict(path_or_sd, label)}
    pairs: list[tuple[str, str]] = []
    if against is not None:
        variants[against_label] = _state_dict(against, against_label)
        pairs.append((label, against_label))
    if pol is not None:
        quantized = _quantized_weights(variants[label], pol)
    if quantized is not None:
        variants[q_label] = _state_dict(quantized, q_label)
        pairs.append((q_label, label))
    out = {
        "spectral_summary": _stack(
            [_tag(spectral_summary(sd, fit_alpha=fit_alpha), v) for v, sd in variants.items()]
        ),
        "family_spectra": _stack([_tag(_if_families(family_spectra, sd), v) for v, sd in variants.items()]),
        "family_summary": _stack(
            [_tag(_if_families(family_summary, sd, fit_alpha=fit_alpha), v) for v, sd in variants.items()]
        ),
    }
    if pairs:
        out["spectral_differential"] = _stack(
            [
                _tag(spectral_differential(variants[v], variants[r], by=_by(variants[v])), v, reference=r)
                for v, r in pairs
            ]
        )
    return out


# --------------------------------------------------------------------------- activations
def _long_square(df: pd.DataFrame, a: str, b: str, value: str = "cka") -> pd.DataFrame:
    """A square/rectangular table (index × columns) as long rows (a, b, value)."""
    long = df.rename_axis(index=a, columns=b).stack(future_stack=True).rename(value).reset_index()
    long[value] = long[value].astype(float)
    return long


def _metrics_per_layer(acts: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    rows = [
        {"layer": name, "position": _position(name), **hidden_state_metrics(h)} for name, h in acts.items()
    ]
    df = pd.DataFrame(rows)
    df["position"] = df["position"].astype("Int64")
    return df


def _position(layer: str) -> int | None:
    """Executed-block position of a ``capture_hidden`` key (None for ``final``)."""
    return int(layer.split("_")[1]) if layer.startswith("block_") else None


def last_block(acts: Mapping[str, torch.Tensor]) -> str:
    """Key of the last executed block's output: PR #2011's "final hidden states".

    qlab's final RMSNorm has no gain, so after it every token has norm √d; the PR's
    numbers (token norms 15–43, depth-trajectory norm ≈ canonical norm) are those of the
    residual stream *before* the final norm, i.e. the last block's output.
    """
    blocks = [k for k in acts if _position(k) is not None]
    if not blocks:
        raise DataError(f"no block outputs captured (got {list(acts)})")
    return max(blocks, key=lambda k: _position(k) or 0)


def _pca_table(
    hidden: torch.Tensor, positions: torch.Tensor, basis_of: torch.Tensor | None = None
) -> pd.DataFrame:
    """3-D PCA of the hidden states with each token's sequence position, singular values
    and explained-variance ratios as columns (so the table alone can be plotted)."""
    df = pca3(hidden, basis_of)
    df.insert(1, "position", positions.numpy())
    for i in range(3):
        df[f"sv_pc{i + 1}"] = df.attrs["singular_values"][i]
        df[f"evr_pc{i + 1}"] = df.attrs["explained_variance_ratio"][i]
    df.attrs = {}
    return df


def _variant_tables(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    bytes_per_token: torch.Tensor | None,
    hidden_tokens: int,
) -> tuple[dict[str, pd.DataFrame], dict[str, torch.Tensor]]:
    """The per-model tables and the captured hidden states (for cross-model CKA)."""
    acts = capture_hidden(model, idx)
    layer = last_block(acts)
    hidden = flatten_tokens(acts[layer], f"{layer} hidden states")
    positions = torch.arange(idx.shape[1]).repeat(idx.shape[0])
    hq = hidden_quant_table(hidden[:hidden_tokens]).assign(
        layer=layer, n_tokens=min(hidden_tokens, len(hidden))
    )
    tables = {
        "depth": depth_trajectory(model, idx, targets, bytes_per_token=bytes_per_token),
        "hidden_metrics": _metrics_per_layer(acts),
        "coord_hist": coordinate_histogram(hidden).assign(layer=layer),
        "norm_hist": norm_histogram(hidden).assign(layer=layer),
        "pca3": _pca_table(hidden, positions).assign(layer=layer),
        "cka_layers": _long_square(cka_matrix(acts), "layer_a", "layer_b"),
        "hidden_quant": hq,
    }
    return tables, acts


def sensitivity_quantizer(bits: int = 6, k: float = 12.85) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``quantize_fn(name, w)`` for :func:`~qlab.analysis.depth.layer_sensitivity`: per-row
    symmetric RTN with the record's SD clip (s = k·std(row)/(2^(b−1) − 1), PAPERS.md §3).

    Applied to every block matrix whatever its size, unlike the policies' size cut-offs,
    so small models show a sensitivity profile too.
    """

    def quantize_fn(name: str, w: torch.Tensor) -> torch.Tensor:
        q = quantize_rtn(w.float(), bits, clip="sdclip", clip_params={"k": k}, name=name)
        return dequantize(q, torch.float32)

    return quantize_fn


def activation_fingerprint(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    *,
    byte_tables: Any = None,
    against_model: nn.Module | None = None,
    quantized_model: nn.Module | None = None,
    sensitivity: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    label: str = "model",
    against_label: str = "reference",
    quantized_label: str = "quantized",
    hidden_tokens: int = HIDDEN_QUANT_TOKENS,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """Activation tables of ``model`` (and of ``against_model`` / ``quantized_model``) on
    the batch ``idx`` → ``targets`` (both (B, T) token ids).

    ``byte_tables`` (:class:`~qlab.data.tokenizer.ByteTables`) turns logit-lens and
    sensitivity scores into bits per byte; without it they are bits per token.
    ``sensitivity`` is a ``quantize_fn`` (e.g. :func:`sensitivity_quantizer`) that adds
    the per-block Δbpb table for ``model``.
    """
    if not isinstance(hidden_tokens, int) or hidden_tokens < 4:
        raise ConfigError(f"hidden_tokens must be an integer ≥ 4, got {hidden_tokens!r}")
    bpt = None
    if byte_tables is not None:
        bpt = token_bytes(byte_tables, idx, targets)  # target t follows input token t
    models = {label: model}
    if against_model is not None:
        models[against_label] = against_model
    if quantized_model is not None:
        models[quantized_label] = quantized_model
    _distinct(
        [label]
        + [against_label] * (against_model is not None)
        + [quantized_label] * (quantized_model is not None)
    )
    per_table: dict[str, list[pd.DataFrame]] = {}
    finals: dict[str, torch.Tensor] = {}
    across: list[pd.DataFrame] = []
    base_acts: dict[str, torch.Tensor] = {}
    for name, m in tqdm(models.items(), disable=not progress, desc="activations"):
        tables, acts = _variant_tables(m, idx, targets, bpt, hidden_tokens)
        for key, df in tables.items():
            per_table.setdefault(key, []).append(_tag(df, name))
        finals[name] = acts[last_block(acts)]
        if name == label:
            base_acts = acts
        else:
            table = _long_square(cka_across(base_acts, acts), "layer_a", "layer_b")
            across.append(_tag(table, label).rename(columns={"variant": "variant_a"}).assign(variant_b=name))
    _shared_pca_basis(per_table["pca3"], finals, label)
    out = {key: _stack(frames) for key, frames in per_table.items()}
    if across:
        out["cka_across"] = _stack(across)
        out["cka_variants"] = _long_square(cka_matrix(finals), "variant_a", "variant_b")
    if sensitivity is not None:
        sens = layer_sensitivity(model, idx, targets, sensitivity, bytes_per_token=bpt, progress=progress)
        out["sensitivity"] = _tag(sens, label)
    return out


def _shared_pca_basis(frames: list[pd.DataFrame], finals: Mapping[str, torch.Tensor], label: str) -> None:
    """Re-project every variant's final states on ``label``'s principal axes (in place),
    so the clouds share coordinates and a per-token shift is meaningful; ``basis`` names
    the variant whose axes were used."""
    ref = flatten_tokens(finals[label], f"{label} final hidden states")
    for i, (name, h) in enumerate(finals.items()):
        old = frames[i]
        if name != label:
            states = flatten_tokens(h, f"{name} final hidden states")
            positions = torch.tensor(old["position"].to_numpy())
            frames[i] = _tag(
                _pca_table(states, positions, basis_of=ref).assign(layer=old["layer"].iloc[0]), name
            )
        frames[i] = frames[i].assign(basis=label)


# --------------------------------------------------------------------------- whole checkpoint
def _label(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    return p.name or str(p)


def _eval_batch(val: torch.Tensor, n_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ⌊n_tokens / L⌋ validation sequences as (idx, targets), L = min(seq_len, n_tokens)."""

    seq_len = min(seq_len, n_tokens)
    rows = min(n_tokens // seq_len, (val.numel() - 1) // seq_len)
    x = val[: rows * seq_len].view(rows, seq_len)
    y = val[1 : rows * seq_len + 1].view(rows, seq_len)
    return x, y


def _meta(rows: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({"key": list(rows), "value": [str(v) for v in rows.values()]})


@dataclass(frozen=True)
class _Job:
    """What :func:`fingerprint` was asked to do, resolved."""

    ckpt: str | os.PathLike
    label: str
    against: str | os.PathLike | None
    against_label: str
    policy: Policy | None
    n_tokens: int
    sensitivity_bits: int | None
    calib_batches: int
    progress: bool

    @property
    def quantized_label(self) -> str | None:
        return f"{self.label} quantized ({self.policy.name})" if self.policy is not None else None


def fingerprint(
    ckpt: str | os.PathLike,
    *,
    against: str | os.PathLike | None = None,
    data: Any = None,
    policy: str | Policy | None = "record",
    n_tokens: int = 1024,
    sensitivity: bool = False,
    sensitivity_bits: int = 6,
    calib_batches: int = 4,
    progress: bool = False,
) -> dict[str, pd.DataFrame]:
    """All weight tables of ``ckpt``; with a qlab run directory and ``data`` (a dataset
    directory, a :class:`~qlab.data.dataset.DatasetInfo` or ``"embedded"``) the activation
    tables on the first ``n_tokens`` validation tokens too.

    With activations, the quantized copy is :func:`~qlab.quant.model_quant.quantize_model`
    with GPTQ calibrated on ``calib_batches`` training batches (0: RTN fallback) and is
    used for both the weight and the activation comparisons. ``against`` is compared by
    weights always and by activations when it is a run directory too. ``sensitivity``
    adds the per-block table (:func:`sensitivity_quantizer` at ``sensitivity_bits``).
    """

    if not isinstance(n_tokens, int) or n_tokens < 8:
        raise ConfigError(f"n_tokens must be an integer ≥ 8, got {n_tokens!r}")
    if not isinstance(calib_batches, int) or calib_batches < 0:
        raise ConfigError(f"calib_batches must be an integer ≥ 0, got {calib_batches!r}")
    fmt = detect_format(ckpt)
    label = _label(ckpt)
    against_label = "reference"
    if against is not None:
        against_label = _label(against)
        against_label = f"{against_label} (reference)" if against_label == label else against_label
    pol = resolve_policy(policy) if policy is not None else None
    job = _Job(
        ckpt, label, against, against_label, pol, n_tokens, sensitivity_bits if sensitivity else None,
        calib_batches, progress,
    )  # fmt: skip
    meta: dict[str, Any] = {"checkpoint": Path(ckpt), "format": fmt, "against": against}
    meta["policy"] = pol.name if pol is not None else "none"
    if fmt == "qlab-run" and data is not None:
        out, info = _with_activations(job, data)
    else:
        out = weight_fingerprint(ckpt, against=against, policy=pol, label=label, against_label=against_label)
        info = {"quantizer": "RTN (no calibration data)" if pol else "none", "activations": False}
    return out | {"meta": _meta(meta | info)}


def _with_activations(job: _Job, data: Any) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Weight and activation tables of a run directory, sharing one quantized copy."""

    ctx = EvalContext.open(job.ckpt, data)
    model, tables = ctx.model, ctx.byte_tables
    idx, targets = _eval_batch(ctx.val_tokens, job.n_tokens, ctx.seq_len)
    info: dict[str, Any] = {"data": ctx.data.root, "activations": True}
    info |= {"n_tokens": idx.numel(), "seq_len": idx.shape[1], "looping": getattr(model, "looping", False)}
    quantized_model, q_sd = None, None
    if job.policy is not None:
        quantized_model, q_sd, info["quantizer"] = _quantize(ctx, job.policy, job.calib_batches, job.progress)
    against_model = None
    if job.against is not None and detect_format(job.against) == "qlab-run":
        against_model, _ = resolve_model(job.against)
    weights = weight_fingerprint(
        job.ckpt, against=job.against, quantized=q_sd, quantized_label=job.quantized_label, label=job.label,
        against_label=job.against_label,
    )  # fmt: skip
    sens = None
    if job.sensitivity_bits is not None:
        sens = sensitivity_quantizer(job.sensitivity_bits)
        info["sensitivity_quantizer"] = f"int{job.sensitivity_bits} per-row RTN, SD clip k=12.85"
    acts = activation_fingerprint(
        model, idx, targets, byte_tables=tables, against_model=against_model, quantized_model=quantized_model,
        sensitivity=sens, quantized_label=job.quantized_label or "quantized", progress=job.progress,
        label=job.label, against_label=job.against_label,
    )  # fmt: skip
    return weights | acts, info


def _quantize(ctx: EvalContext, pol: Policy, calib_batches: int, progress: bool):
    """(dequantized model, its state dict, description) under ``pol``."""

    hessians = ctx.hessians(pol, calib_batches, batch_seqs=2, progress=progress) if calib_batches else None
    qm = quantize_model(ctx.model, pol, hessians=hessians, progress=progress)
    n_gptq, n_rtn = len(qm.meta["gptq_tensors"]), len(qm.meta["rtn_fallback"])
    what = f"{pol.name}: {n_gptq} GPTQ tensors ({calib_batches} calibration batches), {n_rtn} RTN fallback"
    deq = qm.dequantized_model
    return deq, {k: v.detach() for k, v in deq.state_dict().items()}, what


# --------------------------------------------------------------------------- writing
def write_fingerprint(
    results: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write each table as ``out_dir/<name>.csv`` / ``.json`` (records), atomically.

    Returns the written paths in table order. NaN becomes an empty CSV cell / JSON null.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    out = Path(out_dir)
    paths = []
    for name, df in results.items():
        if not _TABLE_NAME.match(name):
            raise ConfigError(f"table name {name!r} is not a safe file name")
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"table {name!r}: expected a DataFrame, got {type(df).__name__}")
        if "csv" in formats:
            paths.append(atomic_write_text(out / f"{name}.csv", df.to_csv(index=False)))
        if "json" in formats:
            text = df.to_json(orient="records", indent=1, force_ascii=False, double_precision=10)
            paths.append(atomic_write_text(out / f"{name}.json", text + "\n"))
    return paths

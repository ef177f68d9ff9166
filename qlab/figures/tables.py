"""The measured tables behind the figures, one function per table, each ``(ws) -> DataFrame``.

Every function only orchestrates library calls (sweeps, pipeline rows, TTT, fingerprints)
on a :class:`~qlab.figures.workspace.Workspace` and caches the result there; the analysis
itself lives in :mod:`qlab.analysis`, :mod:`qlab.eval`, :mod:`qlab.quant` and
:mod:`qlab.compress`. Rows measured here carry ``source="qlab"``; where a figure shows a
paper's numbers beside ours, the paper's rows come from :mod:`qlab.analysis.papers`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from qlab.analysis.allocator import allocate, allocation_rows
from qlab.analysis.eval_levers import eval_levers as measure_eval_levers
from qlab.analysis.fingerprint import fingerprint as run
from qlab.analysis.frontier import rate_frontier
from qlab.analysis.marginal import marginal_table
from qlab.analysis.matrix import MatrixResults, MatrixSpec, collect_results, run_matrix, spec_from_dict
from qlab.analysis.papers import pr639_results, pr1818_seeds
from qlab.analysis.rd import sweep
from qlab.analysis.rd_compare import quantize_setting_fixed, rd_curve, sparsity_budget, std_vs_ratio
from qlab.errors import DataError
from qlab.eval.pipeline import pipeline_row, run_pipeline
from qlab.eval.ttt import TTTConfig, score_first_ttt
from qlab.figures.workspace import Workspace
from qlab.io.checkpoint import read_config
from qlab.io.runlog import read_runlog
from qlab.quant.codebook import NF4_LEVELS, quantize_codebook
from qlab.quant.freezedry import freeze_dry
from qlab.quant.policy import Policy, policy_from_dict
from qlab.train.curriculum import schedule_table

__all__ = [
    "QUANT_EXAMPLE",
    "quant_example",
    "rd_sweep",
    "std_ratio",
    "rd_curves",
    "byte_allocation",
    "stages",
    "damage_gap",
    "quant_gap",
    "ttt_config",
    "ttt_optimizers",
    "ttt_epochs",
    "curriculum",
    "freezedry",
    "sparsity",
    "eval_levers",
    "passthrough",
    "train_curve",
    "fingerprint",
    "matrix",
]

#: PR #1394's quantization example, in units of the matrix σ: int4 clipped at ±4σ, int5
#: at twice that (the (b, k) ~ (b+1, 2k) pair), NF4 with its absmax scale at ±4σ.
QUANT_EXAMPLE = (("int5", 5, 8.0), ("int4", 4, 4.0), ("nf4", 4, 4.0))
_MIN_NUMEL = 1024  # CPU-sized models: sweep every matrix with at least this many weights


# ---------------------------------------------------------------- PR #1394
def quant_example(ws: Workspace) -> pd.DataFrame:
    """Weight histogram of the largest matrix and the code fractions of int5 / int4 / NF4."""

    def build() -> pd.DataFrame:

        name, w = ws.largest_matrix()
        sigma = float(w.std(correction=0))
        counts, edges = np.histogram((w / sigma).numpy().ravel(), bins=73, range=(-6, 6), density=True)
        rows = [
            dict(panel="weights", clip_sigma=math.nan, value=(lo + hi) / 2, fraction=c, width=hi - lo)
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)
        ]
        for label, bits, k in QUANT_EXAMPLE:
            if label == "nf4":
                q = quantize_codebook(w, NF4_LEVELS, torch.tensor(k * sigma), bits=4, name=name)
                values = NF4_LEVELS.numpy() * 7  # NF4 levels drawn on the int4 grid (±7)
                codes = q.codes.reshape(-1).long()
            else:
                q = quantize_setting_fixed(w, bits, k * sigma)
                qmax = 2 ** (bits - 1) - 1
                values = np.arange(-qmax, qmax + 1)
                codes = q.codes.reshape(-1).long() + qmax
            frac = np.bincount(codes.numpy(), minlength=len(values)) / codes.numel()
            widths = np.diff(values, prepend=values[0] - 1).clip(max=1.0) * 0.9
            rows += [
                dict(panel=label, clip_sigma=k, value=float(v), fraction=float(f), width=float(wd))
                for v, f, wd in zip(values, frac, widths)
            ]
        return pd.DataFrame(rows).assign(tensor=name, sigma=sigma)

    return ws.table("quant_example", build)


def rd_sweep(ws: Workspace) -> pd.DataFrame:
    """SDClip over k and quantile search, per bit width, each setting evaluated (Δval_bpb)."""

    def build() -> pd.DataFrame:
        return sweep(
            ws.state_dict,
            ws.scale.sweep_bits,
            ws.scale.sweep_ks,
            ("sdclip", "quantile_search"),
            model=ws.model,
            eval_fn=ws.eval_fn(),
            min_numel=_MIN_NUMEL,
            progress=ws.progress,
        )

    return ws.table("rd_sweep", build)


def std_ratio(ws: Workspace) -> pd.DataFrame:
    """Matrix σ vs compression ratio at one fixed clip (PR #1394's R² claim)."""

    def build() -> pd.DataFrame:
        return std_vs_ratio(ws.state_dict, bits=6, min_numel=_MIN_NUMEL).table

    return ws.table("std_ratio", build)


def rd_curves(ws: Workspace) -> pd.DataFrame:
    """Rate–distortion points of int-b SDClip, NF4 and Lloyd-Max against the Gaussian bound."""

    def build() -> pd.DataFrame:
        return rd_curve(
            ws.state_dict, min_numel=_MIN_NUMEL, max_rows=ws.scale.rd_max_rows, progress=ws.progress
        )

    return ws.table("rd_curves", build)


def byte_allocation(ws: Workspace) -> pd.DataFrame:
    """The marginal table: Δbytes and paired Δbpb (bootstrap CI over documents) of one
    change (bits ± 1, k × 0.8 / × 1.25) to one tensor family at a time."""

    def build() -> pd.DataFrame:
        return marginal_table(
            ws.model, ws.policy, ws.val_tokens, ws.byte_tables, ws.hessians,
            seq_len=ws.seq_len, max_tokens=ws.eval_tokens, progress=ws.progress,
        )  # fmt: skip

    return ws.table("marginal_table", build)


def allocation(ws: Workspace) -> pd.DataFrame:
    """The allocator at the base policy's own artifact size, from :func:`byte_allocation`:
    the chosen settings measured paired against the base and against the uniform recipe
    (the matrices' k solved to the chosen policy's bytes). One row per comparison; no rows
    when the table suggests no change."""

    def build() -> pd.DataFrame:
        table = byte_allocation(ws)
        cap = int(table["base_bytes"].iloc[0])
        out = allocate(ws.model, ws.policy, table, cap, ws.val_tokens, ws.byte_tables, ws.hessians,
                       seq_len=ws.seq_len, max_tokens=ws.eval_tokens)  # fmt: skip
        return allocation_rows(out)

    return ws.table("allocation", build)


def rate_aware_frontier(ws: Workspace) -> pd.DataFrame:
    """Plain GPTQ over the scale's k grid and rate-aware GPTQ over λ at k = 12.85: real
    artifact bytes and paired Δbpb (bootstrap CI) against plain GPTQ at 12.85."""

    def build() -> pd.DataFrame:
        return rate_frontier(ws.model, ws.policy, ws.hessians, ws.val_tokens, ws.byte_tables,
                             seq_len=ws.seq_len, ks=ws.scale.sweep_ks, max_tokens=ws.eval_tokens,
                             progress=ws.progress)  # fmt: skip

    return ws.table("rate_frontier", build)


# ---------------------------------------------------------------- pipeline stages (PR #1818, #639)
def ttt_config(ws: Workspace, **changes: Any) -> TTTConfig:
    """The record's score-first TTT (SGD 0.005, 3 epochs) sized to the scale."""

    base = TTTConfig(
        seq_len=ws.seq_len,
        chunk_tokens=ws.scale.ttt_chunk_tokens,
        stride=max(1, ws.seq_len // 4),
        batch_seqs=ws.scale.ttt_batch_seqs,
        score_batch_seqs=ws.scale.ttt_batch_seqs,
        max_tokens=ws.eval_tokens,
    )
    return dataclasses.replace(base, **changes)


def stages(ws: Workspace) -> pd.DataFrame:
    """One pipeline row of the figure policy: pre-quant → quantized → sliding → score-first TTT."""

    def build() -> pd.DataFrame:
        res = run_pipeline(
            ws.context,
            ws.policy,
            calib_batches=ws.scale.calib_batches,
            stride=max(1, ws.seq_len // 4),
            max_eval_tokens=ws.eval_tokens,
            ttt=ttt_config(ws),
            progress=ws.progress,
        )
        return res.row.assign(variant=f"{ws.config.num_layers}L d{ws.config.model_dim}:{ws.policy.name}")

    return ws.table("stages", build)


def damage_gap(ws: Workspace) -> pd.DataFrame:
    """PR #1818's per-seed stage rows next to qlab's (seed = the run's seed)."""

    row = stages(ws).iloc[0]
    seed = int(read_config(ws.run_dir).get("train", {}).get("seed", 0))
    ours = pd.DataFrame(
        [
            {"source": "qlab", "seed": seed, "stage": st, "bpb": float(row[col])}
            for st, col in (
                ("pre-quantization post-ema", "pre_quant_bpb"),
                ("quantized", "quantized_bpb"),
                ("legal_ttt", "ttt_bpb"),
            )
        ]
    )
    return pd.concat([pr1818_seeds()[["source", "seed", "stage", "bpb"]], ours], ignore_index=True)


def _int6_everywhere(method: str, clip: str, params: dict | None = None) -> Policy:
    spec = {"method": method, "bits": 6, "clip": clip, "clip_params": params or {}}
    return policy_from_dict(
        {
            "name": f"{method}_{clip}_int6",
            "rules": [{"pattern": "*", "ndim": 2, "spec": spec}],
            "default": {"method": "passthrough", "passthrough_dtype": "fp16"},
        }
    )


#: PR #639's comparison, every 2-D tensor at int6: plain RTN, the clip search it replaced
#: (GPTQ-lite: per-row quantile search), and full GPTQ with that clip search or with the
#: record's SDClip (PR #639 does not say which clip its GPTQ used).
GAP_METHODS = (
    ("RTN (absmax clip)", "rtn", "absmax", None),
    ("clip search (GPTQ-lite)", "rtn", "quantile_search", None),
    ("full GPTQ (quantile clip)", "gptq", "quantile_search", None),
    ("full GPTQ (SDClip k=12.85)", "gptq", "sdclip", {"k": 12.85}),
)


def quant_gap(ws: Workspace) -> pd.DataFrame:
    """Quantization gap (quantized − pre-quant, mBPB) per method, qlab's and PR #639's."""

    def build() -> pd.DataFrame:
        rows = []
        for label, method, clip, params in GAP_METHODS:
            row = pipeline_row(
                ws.model,
                _int6_everywhere(method, clip, params),
                ws.dataset,
                calib_batches=ws.scale.calib_batches,
                stride=None,
                max_eval_tokens=ws.eval_tokens,
            ).iloc[0]
            rows.append(
                {
                    "source": "qlab",
                    "method": label,
                    "gap_mbpb": row["quant_tax_mbpb"],
                    "quantized_bpb": row["quantized_bpb"],
                    "artifact_bytes": row["artifact_bytes"],
                }
            )
        return pd.DataFrame(rows)

    paper = pr639_results()
    paper = paper[paper["metric"] == "quant_gap"]
    names = {"clip-search": "clip search (GPTQ-lite)", "full GPTQ": "full GPTQ"}
    paper_rows = pd.DataFrame(
        {
            "source": paper["source"],
            "method": [next(v for k, v in names.items() if s.startswith(k)) for s in paper["setting"]],
            "gap_mbpb": 1e3 * paper["value"],
        }
    )
    return pd.concat([ws.table("quant_gap", build), paper_rows], ignore_index=True)


def ttt_optimizers(ws: Workspace) -> pd.DataFrame:
    """Score-first TTT on the GPTQ model with SGD (the record's) and AdamW (PR #639's
    lr 1e-4), plus the no-adaptation reference (lr 0): running bpb per chunk."""

    def build() -> pd.DataFrame:
        runs = {
            "no TTT (lr 0)": ttt_config(ws, lr=0.0, epochs=1),
            "SGD lr 0.005 (record)": ttt_config(ws),
            "AdamW lr 1e-4 (PR #639)": ttt_config(ws, optimizer="adamw", lr=1e-4),
        }
        frames = []
        model = ws.quantized.dequantized_model
        for label, cfg in runs.items():
            res = score_first_ttt(model, ws.val_tokens, ws.byte_tables, cfg, progress=ws.progress)
            frames.append(res.per_chunk.assign(optimizer=label, final_bpb=res.val_bpb, source="qlab"))
        return pd.concat(frames, ignore_index=True)

    return ws.table("ttt_optimizers", build)


def ttt_epochs(ws: Workspace) -> pd.DataFrame:
    """Final score-first TTT bpb vs TTT epochs (PR #1718 tried 4 instead of 3)."""

    def build() -> pd.DataFrame:
        rows = []
        for epochs in ws.scale.ttt_epochs:
            res = score_first_ttt(
                ws.quantized.dequantized_model, ws.val_tokens, ws.byte_tables, ttt_config(ws, epochs=epochs)
            )
            rows.append({"source": "qlab", "epochs": epochs, "ttt_bpb": res.val_bpb})
        return pd.DataFrame(rows)

    return ws.table("ttt_epochs", build)


# ---------------------------------------------------------------- PR #1818 mechanisms
def curriculum(ws: Workspace | None = None, n_buckets: int = 8, floor: float = 0.02) -> pd.DataFrame:
    """The entropy-bucket crossfade and sampling probabilities over training (no model)."""

    return schedule_table(np.linspace(0.0, 1.0, 51).tolist(), n_buckets=n_buckets, floor=floor)


def freezedry(ws: Workspace) -> pd.DataFrame:
    """Freeze-dry residual histogram of the largest matrix (|residual| bins, threshold 0.005)."""

    def build() -> pd.DataFrame:
        name, w = ws.largest_matrix()
        res = freeze_dry(w, name=name)
        r = res.residuals.abs().flatten().numpy()
        hi = max(float(np.quantile(r, 0.995)), 5 * res.threshold)
        counts, edges = np.histogram(r, bins=60, range=(0.0, hi))
        return pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": counts}).assign(
            tensor=name,
            threshold=res.threshold,
            n_interior=r.size,
            candidate_fraction=res.candidate_fraction,
            drop_fraction=res.drop_fraction,
            skipped=res.skipped,
            weight_std=float(w.std()),
        )

    return ws.table("freezedry", build)


def sparsity(ws: Workspace) -> pd.DataFrame:
    """:func:`qlab.analysis.rd_compare.sparsity_budget` of the checkpoint's matrices."""
    return ws.table("sparsity", lambda: sparsity_budget(ws.state_dict, min_numel=_MIN_NUMEL))


# ---------------------------------------------------------------- PR #1718
def eval_levers(ws: Workspace) -> pd.DataFrame:
    """:func:`qlab.analysis.eval_levers.eval_levers` of the float model on the scale's
    validation slice: eval length ½L, L, 2L × standard / sliding windows, paired Δbpb."""

    def build() -> pd.DataFrame:
        train_len = int(ws.config.train_seq_len)
        return measure_eval_levers(ws.model, ws.val_tokens, ws.byte_tables, train_seq_len=train_len,
                                   max_tokens=ws.eval_tokens)  # fmt: skip

    return ws.table("eval_levers_paired", build)


def passthrough(ws: Workspace) -> pd.DataFrame:
    """Artifact bytes and quantized bpb of ``record`` (small tensors fp16) vs ``record_pathA``
    (control tensors int8 per tensor, small matrices int8 per row), real brotli-11 bytes."""

    def build() -> pd.DataFrame:
        rows = []
        for name in ("record", "record_pathA"):
            row = pipeline_row(
                ws.context,
                name,
                calib_batches=ws.scale.calib_batches,
                stride=None,
                max_eval_tokens=ws.eval_tokens,
            ).iloc[0]
            rows.append(
                {
                    "source": "qlab",
                    "policy": name,
                    "artifact_bytes": row["artifact_bytes"],
                    "quantized_bpb": row["quantized_bpb"],
                    "pre_quant_bpb": row["pre_quant_bpb"],
                }
            )
        return pd.DataFrame(rows)

    return ws.table("passthrough", build)


# ---------------------------------------------------------------- training, fingerprints, matrix
def train_curve(ws: Workspace) -> pd.DataFrame:
    """The run's logged train loss and validation bpb per step (plot_train_curves' schema)."""

    log = read_runlog(ws.run_dir)
    seed = int(read_config(ws.run_dir).get("train", {}).get("seed", 0))
    log = log[log["kind"].isin(["train", "val", "final"])]
    cols = {c: log.get(c, np.nan) for c in ("train_loss", "val_bpb")}
    out = pd.DataFrame({"source": "qlab", "seed": seed, "step": log["step"], **cols})
    return out.groupby(["source", "seed", "step"], as_index=False).first()


def fingerprint(ws: Workspace, table: str) -> pd.DataFrame:
    """One table of :func:`qlab.analysis.fingerprint.fingerprint` of the checkpoint against
    its GPTQ-quantized copy (activation tables on the scale's validation tokens)."""

    key = f"fingerprint.{table}"
    if key not in ws._tables and not (ws.work / "tables" / f"{key}.json").is_file():
        weights_only = ws.weights_only  # then the weight tables alone, quantized copy by RTN
        tables = run(
            ws.weights_path,
            data=None if weights_only else ws.dataset,
            policy=ws.policy,
            n_tokens=ws.scale.fingerprint_tokens,
            calib_batches=ws.scale.calib_batches,
            progress=ws.progress,
        )
        for name, df in tables.items():
            if name != "meta":
                ws.table(f"fingerprint.{name}", functools.partial(pd.DataFrame.copy, df))
    return ws.table(key, lambda: _missing(key))


def _missing(key: str) -> pd.DataFrame:
    raise DataError(f"figure table {key!r}: the fingerprint did not produce it")


def matrix_spec(ws: Workspace) -> MatrixSpec:
    """A small reg × quant matrix on the embedded corpus: two bases (PR #2011's A and B
    shapes at CPU size), the scale's variants and seeds, every hidden-state scheme."""

    s = ws.scale
    small = {
        "vocab_size": 512,
        "num_layers": 2,
        "num_heads": 2,
        "rope_dims": 8,
        "mlp_mult": 2.0,
        "loop_layers": [1],
        "loop_repeats": 2,
    }
    int6 = {
        "rules": [{"pattern": "*", "ndim": 2, "spec": {"method": "rtn", "bits": 6, "clip": "absmax"}}],
        "default": {"method": "passthrough", "passthrough_dtype": "fp16"},
    }
    return spec_from_dict(
        {
            "name": f"figures-{s.name}",
            "seeds": list(s.matrix_seeds),
            "variants": list(s.matrix_variants),
            "bases": {
                "A": {
                    "preset": "tiny",
                    "data": "embedded",
                    "train": s.matrix_train,
                    "model": {**small, "model_dim": 32, "num_kv_heads": 1},
                },
                "B": {
                    "preset": "tiny",
                    "data": "embedded",
                    "train": {**s.matrix_train, "matrix_lr": 0.03},
                    "model": {
                        **small,
                        "model_dim": 48,
                        "num_kv_heads": 2,
                        "activation": "relu2",
                        "xsa": False,
                        "skip_gates": False,
                    },
                },
            },
            "quant": {
                "hidden_schemes": "all",
                "hidden_tokens": 128,
                "weight_policies": ["int6_all"],
                "policies": {"int6_all": int6},
            },
            "eval": {"val_max_tokens": 2049, "batch_seqs": 16, "sliding_stride": 32},
        },
        where="figures matrix spec",
    )


def matrix(ws: Workspace) -> MatrixResults:
    """Run (or resume) the small matrix under the work directory and collect its results."""

    if "matrix" not in ws.memo:
        spec = matrix_spec(ws)
        # a cache folder per spec: a grid folder refuses another spec's cells, never mixes them
        digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        out = ws.work / f"matrix-{digest}"
        run_matrix(spec, out, progress=ws.progress)
        ws.memo["matrix"] = collect_results(out)
    return ws.memo["matrix"]

"""Post-quantization calibration: refit the small control tensors after quantizing.

PR #1818 proposes it against the "damage gap": after the matrices are quantized, fit
only the cheap per-channel controls (output scales, residual mixes, q gains, skip
weights, norm weights and biases) so that each block's output of the quantized model
matches the full-precision model on a few calibration batches. Loss =
Σ_blocks MSE(block_out_q, block_out_fp), minimised with Adam; every matrix is frozen.

Model contract: ``model.block_outputs(idx) -> list[Tensor]`` (as qlab.model.gpt.GPT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatch

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.errors import NumericalError, QuantError
from qlab.model.gpt import GPT

__all__ = ["DEFAULT_PATTERNS", "control_parameters", "block_mse", "calibrate_controls"]

#: fnmatch patterns (full parameter names) of the control tensors that are refitted.
DEFAULT_PATTERNS: tuple[str, ...] = (
    "*attn_scale",
    "*mlp_scale",
    "*resid_mix",
    "*q_gain",
    "skip_*",
    "*.skip_*",
    "*.bias",
)
_NORMS = tuple(
    c for c in (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, getattr(nn, "RMSNorm", None)) if c is not None
)


def control_parameters(
    model: nn.Module, patterns: Sequence[str] = DEFAULT_PATTERNS, *, include_norms: bool = True
) -> dict[str, nn.Parameter]:
    """Parameters whose name matches a pattern, plus (``include_norms``) norm-module weights/biases."""
    chosen = {n: p for n, p in model.named_parameters() if any(fnmatch(n, pat) for pat in patterns)}
    for mod_name, mod in model.named_modules() if include_norms else ():
        if isinstance(mod, _NORMS):
            for p_name, p in mod.named_parameters(recurse=False):
                chosen[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return chosen


def _check_pair(model_fp: nn.Module, model_q: nn.Module) -> None:
    fp = {n: tuple(p.shape) for n, p in model_fp.named_parameters()}
    q = {n: tuple(p.shape) for n, p in model_q.named_parameters()}
    if fp != q:
        diff = sorted(set(fp.items()) ^ set(q.items()))[:3]
        raise QuantError(f"calibration: the two models differ in parameters (first differences: {diff})")
    for m in (model_fp, model_q):
        if not callable(getattr(m, "block_outputs", None)):
            raise QuantError(f"calibration: {type(m).__name__} has no block_outputs(idx) method")


def _block_loss(outs_q: list[torch.Tensor], outs_fp: list[torch.Tensor]) -> torch.Tensor:
    if len(outs_q) != len(outs_fp) or not outs_q:
        raise QuantError(f"calibration: block_outputs gave {len(outs_q)} vs {len(outs_fp)} blocks")
    total = torch.zeros(())
    for a, b in zip(outs_q, outs_fp):
        total = total + torch.mean((a.float() - b.float()) ** 2)
    return total


@torch.no_grad()
def block_mse(model_fp: GPT, model_q: GPT, batches: Sequence[torch.Tensor]) -> float:
    """Mean over batches of Σ_blocks MSE(block_out_q, block_out_fp)."""
    _check_pair(model_fp, model_q)
    if not batches:
        raise QuantError("calibration: no batches given")
    total = sum(float(_block_loss(model_q.block_outputs(b), model_fp.block_outputs(b))) for b in batches)
    return total / len(batches)


def calibrate_controls(
    model_fp: GPT,
    model_q: GPT,
    batches: Sequence[torch.Tensor],
    *,
    steps: int = 50,
    lr: float = 3e-3,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    include_norms: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Adam on ``model_q``'s control tensors (in place) to match ``model_fp`` block outputs.

    Step t uses batch t mod len(batches). Returns one row per step: ``step``, ``batch``,
    ``loss`` (Σ_blocks MSE on that batch before the update). Other parameters are never
    changed; ``requires_grad`` flags and train/eval modes are restored afterwards.
    """
    _check_pair(model_fp, model_q)
    if not batches:
        raise QuantError("calibration: no batches given")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not lr > 0:
        raise QuantError(f"calibration: need steps ≥ 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
    controls = control_parameters(model_q, patterns, include_norms=include_norms)
    if not controls:
        raise QuantError(
            f"calibration: no parameter of the quantized model matches {list(patterns)}"
            f"{' or is a norm weight/bias' if include_norms else ''}"
        )
    fp_training = model_fp.training
    try:
        model_fp.eval()
        with torch.no_grad():
            targets = [[o.detach() for o in model_fp.block_outputs(b)] for b in batches]
    finally:
        model_fp.train(fp_training)
    flags = {n: p.requires_grad for n, p in model_q.named_parameters()}
    was_training = model_q.training
    rows = []
    try:
        for p in model_q.parameters():
            p.requires_grad_(False)
        for p in controls.values():
            p.requires_grad_(True)
        model_q.eval()
        opt = torch.optim.Adam(list(controls.values()), lr=lr)
        for step in tqdm(range(steps), disable=not progress, desc="calibrate"):
            k = step % len(batches)
            loss = _block_loss(model_q.block_outputs(batches[k]), targets[k])
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NumericalError(f"calibration: loss became {value} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows.append({"step": step, "batch": k, "loss": value})
    finally:
        for n, p in model_q.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model_q.train(was_training)
    return pd.DataFrame(rows)

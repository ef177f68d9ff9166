"""Activation capture on a fixed batch, shared by the CKA, geometry and depth analyses.

:func:`capture` hooks arbitrary named modules; :func:`capture_hidden` uses the qlab GPT
contract (``final_hidden`` / ``block_outputs``) so depth-recurrent models report every
*executed* block, not just the last call of a reused module. Captured tensors are
detached float32 CPU copies; the model's train/eval mode is restored afterwards and
hooks are always removed, even when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from qlab.errors import ConfigError, DataError
from qlab.model.modes import block_outputs, eval_mode, final_hidden

__all__ = ["capture", "capture_hidden", "default_module_names", "flatten_tokens"]


def default_module_names(model: nn.Module) -> list[str]:
    """The blocks of a model (``blocks.0``, ``blocks.1``, …) if it has a ``blocks`` list,
    else its direct children."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return [f"blocks.{i}" for i in range(len(blocks))]
    return [name for name, _ in model.named_children()]


def _first_tensor(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


def capture(
    model: nn.Module,
    idx: torch.Tensor,
    module_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Outputs of the named modules during ``model(idx)``.

    ``module_names`` defaults to :func:`default_module_names`. A module called more than
    once (depth recurrence) yields ``name``, ``name#1``, ``name#2``, … in call order.
    Modules whose output holds no tensor are left out.
    """
    names = list(default_module_names(model) if module_names is None else module_names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"model has no module named {missing}; e.g. {list(modules)[1:6]}")
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            t = _first_tensor(output)
            if t is None:
                return
            key, k = name, 0
            while key in captured:
                k += 1
                key = f"{name}#{k}"
            captured[key] = t.detach().float().cpu().clone()

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(idx)
    finally:
        for h in handles:
            h.remove()
    return captured


def capture_hidden(model: nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"block_0": …, "block_1": …, "final": …}`` — residual stream after each executed
    block and the final-norm output, via the GPT contract (float32 CPU copies).

    Models without ``block_outputs``/``final_hidden`` raise ConfigError: use
    :func:`capture` with explicit module names instead.
    """
    if not (
        callable(getattr(model, "block_outputs", None)) and callable(getattr(model, "final_hidden", None))
    ):
        raise ConfigError(
            f"{type(model).__name__} lacks block_outputs()/final_hidden(); use capture(model, idx, names)"
        )

    with eval_mode(model), torch.no_grad():
        out = {f"block_{i}": h.detach().float().cpu() for i, h in enumerate(block_outputs(model, idx))}
        out["final"] = final_hidden(model, idx).detach().float().cpu()
    return out


def flatten_tokens(h: torch.Tensor, name: str = "hidden states") -> torch.Tensor:
    """(…, d) → (n, d) with all leading axes folded into tokens; validates finiteness."""
    if not isinstance(h, torch.Tensor) or h.ndim < 2:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise DataError(f"{name}: expected a tensor of shape (n, d) or (B, T, d), got {got}")
    h2 = h.reshape(-1, h.shape[-1])
    if h2.shape[0] < 2 or h2.shape[1] < 1:
        raise DataError(f"{name}: need at least 2 tokens and 1 feature, got {tuple(h2.shape)}")
    if not bool(torch.isfinite(h2).all()):
        raise DataError(f"{name}: contains NaN or Inf")
    return h2

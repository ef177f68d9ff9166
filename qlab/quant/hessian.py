"""Hessian collection for GPTQ: H = Σ XᵀX of each large linear layer's inputs.

Forward pre-hooks on every ``nn.Linear`` with more than ``min_numel`` weights add XᵀX
(float32, on the weight's device) for each calibration batch; the sums are divided by the
number of batches (PAPERS.md §3). A tied embedding (``tok_emb.weight`` reused as the LM
head) gets the Hessian of the head's input, the output of the final norm, which the
model exposes as ``model.final_hidden(idx)``; in that case the forward pass is
``final_hidden`` (it runs every block, so the block hooks fire too) instead of ``model(idx)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.checks import all_finite
from qlab.errors import DataError, QuantError


def _input_ids(batch) -> torch.Tensor:
    """A batch is token ids, or a tuple/list whose first item is the ids (inputs, targets)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("calibration batch is an empty tuple")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise DataError(f"calibration batch must be a tensor of token ids, got {type(batch).__name__}")
    return batch


def _tied_embedding(model: nn.Module, min_numel: int) -> tuple[str, nn.Embedding, Callable] | None:
    """(name, embedding, the model's final_hidden) for an embedding that doubles as the LM
    head, if the model has one and exposes final_hidden (the head's input)."""
    final_hidden = getattr(model, "final_hidden", None)
    if not callable(final_hidden):
        return None
    names = {name for name, _ in model.named_parameters()}
    if "lm_head.weight" in names:
        return None  # untied head: its own Linear hook covers it
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and mod.weight.numel() > min_numel:
            pname = f"{mod_name}.weight" if mod_name else "weight"
            if pname == "tok_emb.weight" or mod_name.endswith("tok_emb"):
                return pname, mod, final_hidden
    return None


def _xtx(key: str, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
    if not all_finite(x):
        raise QuantError(f"Hessian for {key!r}: layer input contains NaN/Inf")
    return x.T @ x


def _add(store: dict[str, torch.Tensor], key: str, xtx: torch.Tensor) -> None:
    if key in store:
        store[key] += xtx
    else:
        store[key] = xtx.clone()


class _SharedInputs:
    """Layers called one after another on the same input tensor (c_q, c_k, c_v) get one
    XᵀX per call, computed once; at the end a layer whose every call reused another's
    product holds that layer's Hessian itself (one tensor per distinct input)."""

    def __init__(self) -> None:
        self.last: tuple[torch.Tensor, str, torch.Tensor] | None = None
        self.sources: dict[str, set[str]] = {}

    def product(self, key: str, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.last is not None and self.last[0] is x and self.last[1] != key:
            source, xtx = self.last[1], self.last[2]
        else:
            source, xtx = key, _xtx(key, x, device)
            self.last = (x, key, xtx)
        self.sources.setdefault(key, set()).add(source)
        return xtx

    def alias(self, store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(store)
        for key, sources in self.sources.items():
            (source,) = sources if len(sources) == 1 else (key,)
            if source != key and torch.equal(store[key], store[source]):
                out[key] = out[source]  # the same sums in the same order: share the tensor
        return out


def collect_hessians(
    model: nn.Module,
    batches: Iterable,
    *,
    min_numel: int = 65536,
    include_tied_embedding: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` and return {parameter name: mean-over-batches XᵀX}.

    Keys are parameter names such as ``blocks.0.attn.c_q.weight`` (a Linear reached under
    several names is keyed by its first). Layers that read the same input share one
    Hessian tensor (``hessians["…c_k.weight"] is hessians["…c_q.weight"]``), which
    GPTQ then factorises once. Raises DataError if ``batches`` is empty.
    """
    param_names = {id(p): n for n, p in model.named_parameters()}
    store: dict[str, torch.Tensor] = {}
    shared = _SharedInputs()
    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.numel() > min_numel:
            key = param_names[id(mod.weight)]
            dev = mod.weight.device

            def hook(_m, args, key=key, dev=dev):
                _add(store, key, shared.product(key, args[0], dev))

            handles.append(mod.register_forward_pre_hook(hook))
    tied = _tied_embedding(model, min_numel) if include_tied_embedding else None
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="hessians", disable=not progress):
                idx = _input_ids(batch)
                if tied is not None:  # the head's input is the final hidden state
                    name, emb, final_hidden = tied
                    _add(store, name, _xtx(name, final_hidden(idx), emb.weight.device))
                else:
                    model(idx)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise DataError("collect_hessians: no calibration batches were given")
    means = {k: v / n_batches for k, v in store.items()}
    return shared.alias(means)

"""The record stack's optimizers, built from ``model.param_groups()``, and their schedules.

- "matrix" (2-D block weights) → :class:`~qlab.train.muon.Muon`, lr 0.02, wd 0.085;
- "embed"  (embeddings) → AdamW, lr 0.03 when tied (0.6 when untied), wd 0.085;
- "scalar" (gains, scales, mixes, skip weights) → AdamW, lr 0.02, wd 0.02;
- "head"   (an untied lm_head only) → AdamW with wd 0 (= Adam), lr 0.008;
AdamW with betas (0.9, 0.95) and ``fused=True`` as in the record (PR #1394): torch's fused
kernel exists for CPU and CUDA tensors; on any other device (MPS, XLA) we fall back to the
unfused loop, which differs from the fused kernel by ~2e-7 relative per step.
Each param group remembers its ``base_lr``; :meth:`Optimizers.apply_schedule` sets
lr = base_lr × multiplier and Muon's warmed-up momentum before every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qlab.errors import CheckpointError, ConfigError
from qlab.model.gpt import GPT
from qlab.train.config import TrainConfig
from qlab.train.muon import Muon
from qlab.train.schedule import muon_momentum

GROUP_NAMES = ("matrix", "embed", "scalar")


class Optimizers:
    """Muon + AdamW over one model, stepped, zeroed, scheduled and saved together."""

    def __init__(self, named: dict[str, torch.optim.Optimizer], config: TrainConfig) -> None:
        self.named = named
        self.config = config

    def __iter__(self):
        return iter(self.named.values())

    def zero_grad(self) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self:
            opt.step()

    def apply_schedule(self, step: int, lr_mult: float) -> None:
        """lr = base_lr·lr_mult for every group; Muon momentum warmed up by ``step``."""
        c = self.config
        momentum = muon_momentum(
            step, c.muon_momentum_warmup_start, c.muon_momentum, c.muon_momentum_warmup_steps
        )
        for name, opt in self.named.items():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mult
                if name == "matrix":
                    group["momentum"] = momentum

    def current_lrs(self) -> dict[str, float]:
        return {name: opt.param_groups[0]["lr"] for name, opt in self.named.items()}

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.named.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.named):
            raise CheckpointError(
                f"optimizer state holds groups {sorted(state)}, the model needs {sorted(self.named)}"
            )
        for name, opt in self.named.items():
            try:
                opt.load_state_dict(state[name])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(
                    f"optimizer state for group {name!r} does not fit the model ({exc})"
                ) from exc


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw_supported(params: Sequence[torch.Tensor]) -> bool:
    """True when torch's fused AdamW kernel runs on every parameter (CPU or CUDA floats)."""
    return all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)


def build_optimizers(model: GPT, config: TrainConfig) -> Optimizers:
    """Muon for "matrix", AdamW for "embed" and "scalar" (empty groups get no optimizer)."""
    groups = model.param_groups()
    unknown = set(groups) - set(GROUP_NAMES)
    if unknown:
        raise ConfigError(f"model.param_groups() returned unknown group(s) {sorted(unknown)}")
    c = config
    named: dict[str, torch.optim.Optimizer] = {}
    if groups.get("matrix"):
        params = [p for _, p in groups["matrix"]]
        named["matrix"] = Muon(
            [{"params": params, "base_lr": c.matrix_lr}],
            lr=c.matrix_lr,
            momentum=c.muon_momentum_warmup_start if c.muon_momentum_warmup_steps else c.muon_momentum,
            weight_decay=c.muon_wd,
            nesterov=True,
            row_normalize=c.muon_row_normalize,
            ns_steps=c.muon_ns_steps,
            record_bf16=getattr(getattr(model, "config", None), "precision", "fp32") == "record",
        )
    embed = list(groups.get("embed", []))
    head = [p for n, p in embed if n.startswith("lm_head.")]
    embed_params = [p for n, p in embed if not n.startswith("lm_head.")]
    # The record: a tied embedding trains at TIED_EMBED_LR; an untied one at EMBED_LR, with
    # its lm_head in a separate Adam (no weight decay) at HEAD_LR.
    embed_lr = c.untied_embed_lr if head else c.embed_lr
    for name, params, lr, wd in (
        ("embed", embed_params, embed_lr, c.embed_wd),
        ("scalar", [p for _, p in groups.get("scalar", [])], c.scalar_lr, c.scalar_wd),
        ("head", head, c.head_lr, 0.0),
    ):
        if params:
            named[name] = torch.optim.AdamW(
                [{"params": params, "base_lr": lr}],
                lr=lr,
                betas=(c.beta1, c.beta2),
                eps=c.adam_eps,
                weight_decay=wd,
                fused=fused_adamw_supported(params),
            )
    return Optimizers(named, config)

"""Stochastic weight averaging during warm-down, blended with the EMA (PR #639).

PR #639 took 16 snapshots, one every 50 steps of the final warm-down, and shipped
0.5·EMA + 0.5·SWA. :class:`SWA` keeps the running mean of the snapshots in float32
(avg ← avg + (w − avg)/n), so memory is one copy of the weights whatever the count;
:func:`blend` mixes two state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qlab.checks import all_finite
from qlab.errors import CheckpointError, ConfigError, NumericalError


def _state(source: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return source.state_dict() if isinstance(source, nn.Module) else source


class SWA:
    """Running mean of weight snapshots taken every ``every`` steps while in warm-down."""

    def __init__(self, every: int = 50) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"SWA every must be a positive integer, got {every!r}")
        self.every = every
        self.count = 0
        self.mean: dict[str, Tensor] = {}

    def due(self, step: int, in_warmdown: bool) -> bool:
        """Whether ``step`` is a snapshot step: in warm-down and a multiple of ``every``."""
        return bool(in_warmdown) and step % self.every == 0

    def maybe_update(self, model: nn.Module | Mapping[str, Tensor], step: int, in_warmdown: bool) -> bool:
        """Snapshot ``model`` if :meth:`due`; returns whether it did."""
        if not self.due(step, in_warmdown):
            return False
        self.update(model)
        return True

    @torch.no_grad()
    def update(self, model: nn.Module | Mapping[str, Tensor]) -> None:
        """Fold one snapshot into the mean (float entries); non-float entries keep the latest value."""
        state = _state(model)
        if self.count and set(state) != set(self.mean):
            raise CheckpointError(
                f"SWA snapshot keys differ from earlier snapshots: {sorted(set(state) ^ set(self.mean))[:5]}"
            )
        self.count += 1
        for key, value in state.items():
            v = value.detach()
            if not v.is_floating_point():
                self.mean[key] = v.clone()
            elif self.count == 1:
                self.mean[key] = v.to(torch.float32).clone()
            else:
                self.mean[key].add_(v.to(torch.float32) - self.mean[key], alpha=1.0 / self.count)

    def average(self) -> dict[str, Tensor]:
        """The mean of all snapshots (float32 for float entries); ConfigError before the first one."""
        if not self.count:
            raise ConfigError("SWA has no snapshot yet (warm-down not reached, or `every` too large)")
        return {k: v.clone() for k, v in self.mean.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "count": self.count, "mean": dict(self.mean)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        count, mean = state.get("count"), state.get("mean")
        if (
            not isinstance(count, int)
            or count < 0
            or not isinstance(mean, Mapping)
            or bool(count) != bool(mean)
        ):
            raise CheckpointError("SWA state must hold a non-negative int 'count' and a matching 'mean' dict")
        self.every = int(state.get("every", self.every))
        self.count = count
        self.mean = {k: v.clone() for k, v in mean.items()}


def blend(
    ema_state: Mapping[str, Tensor], swa_state: Mapping[str, Tensor], alpha: float = 0.5
) -> dict[str, Tensor]:
    """alpha·ema + (1 − alpha)·swa per float entry, in the EMA's dtype (PR #639: alpha = 0.5).

    Keys must match; non-float entries must be equal and are taken from the EMA.
    Non-finite inputs raise NumericalError naming the entry.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"blend alpha must be a number in [0, 1], got {alpha!r}")
    if set(ema_state) != set(swa_state):
        diff = sorted(set(ema_state) ^ set(swa_state))
        raise CheckpointError(f"blend: EMA and SWA state dicts differ in keys {diff[:5]}")
    out = {}
    for key, e in ema_state.items():
        s = swa_state[key]
        if e.shape != s.shape:
            raise CheckpointError(f"blend: {key} has shape {tuple(e.shape)} in EMA, {tuple(s.shape)} in SWA")
        if not e.is_floating_point():
            if not torch.equal(e, s.to(e.dtype)):
                raise CheckpointError(f"blend: non-float entry {key} differs between EMA and SWA")
            out[key] = e.clone()
            continue
        mixed = alpha * e.to(torch.float32) + (1.0 - alpha) * s.to(torch.float32)
        if not all_finite(mixed):
            raise NumericalError(f"blend: entry {key} is not finite")
        out[key] = mixed.to(e.dtype)
    return out

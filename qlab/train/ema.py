"""Exponential moving average of the weights (decay 0.997 in the record stack).

The EMA — not the raw weights — is what the record evaluates, quantizes and ships, so
the checkpoint's ``model.safetensors`` holds it. Kept in fp32 whatever the model dtype,
so 0.3 % increments are not lost to bf16 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qlab.errors import CheckpointError, ConfigError


class EMA:
    """ema ← decay·ema + (1 − decay)·w after every optimizer step, for every state-dict entry."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            k: v.detach().to(torch.float32).clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.lerp_(v.detach().to(torch.float32), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        extra = set(state) - set(self.shadow)
        if missing or extra:
            raise CheckpointError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(extra)[:5]}"
            )
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def weights_like(self, model: nn.Module) -> dict[str, Tensor]:
        """The EMA cast to the model's own dtypes (what gets saved and evaluated)."""
        ref = model.state_dict()
        return {k: self.shadow[k].to(ref[k].dtype) for k in ref}

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA into ``model`` (e.g. for validation), then restore."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights_like(model))
        try:
            yield model
        finally:
            model.load_state_dict(backup)

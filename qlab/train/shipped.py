"""The weights a run ships: the raw weights, the EMA, the SWA mean, or EMA and SWA blended.

``model.safetensors`` holds these; the final validation scores them, swapped into the
training model for the duration (:func:`qlab.model.modes.swapped_weights`).
"""

from __future__ import annotations

from torch import Tensor, nn

from qlab.train.ema import EMA
from qlab.train.swa import SWA, blend

__all__ = ["shipped_weights", "weights_kind"]


def weights_kind(ema: EMA | None, swa: SWA | None) -> str:
    """Which weights model.safetensors holds: raw, ema, swa or ema+swa."""
    base = "ema" if ema is not None else "raw"
    if swa is None or swa.count == 0:
        return base
    return "ema+swa" if ema is not None else "swa"


def shipped_weights(
    model: nn.Module, ema: EMA | None, swa: SWA | None, swa_blend: float
) -> dict[str, Tensor]:
    """blend(EMA, SWA, swa_blend), else the SWA mean, the EMA or the raw weights (model dtypes)."""
    ref = model.state_dict()
    if swa is None or swa.count == 0:
        return ema.weights_like(model) if ema is not None else dict(ref)
    state = swa.average()
    if ema is not None:
        state = blend(ema.state_dict(), state, swa_blend)
    return {k: state[k].to(ref[k].dtype) for k in ref}

"""Does a Hadamard rotation help these weights? Kurtosis and rounding error, with and without.

PR #1718 reports no gain from rotating Muon-trained weights (excess kurtosis ≈ −1.2: lighter
tails than Gaussian, nothing for incoherence processing to spread); :func:`rotation_report`
measures the same on any weights, using the quantizer of :mod:`qlab.quant.rotation`.
"""

from __future__ import annotations

import pandas as pd
import torch

from qlab.analysis.geometry import excess_kurtosis
from qlab.quant.rotation import check_rotatable, quantize_rotated, rotate
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize

__all__ = ["rotation_report"]


def rotation_report(
    weights: dict[str, torch.Tensor], bits: int = 4, *, seed: int | None = 0, **rtn_kwargs
) -> pd.DataFrame:
    """Per tensor: excess kurtosis and RTN max / RMS error with and without the rotation."""
    rows = []
    for name, w in weights.items():
        check_rotatable(w, name)
        wf = w.detach().to(torch.float32)
        plain = dequantize(quantize_rtn(wf, bits, name=name, **rtn_kwargs))
        rot = dequantize(quantize_rotated(wf, bits, seed=seed, name=name, **rtn_kwargs))
        rows.append(
            {
                "name": name,
                "kurtosis": excess_kurtosis(wf),
                "kurtosis_rotated": excess_kurtosis(rotate(wf, seed=seed)),
                "max_err": float((plain - wf).abs().max()),
                "max_err_rotated": float((rot - wf).abs().max()),
                "rms_err": float((plain - wf).pow(2).mean().sqrt()),
                "rms_err_rotated": float((rot - wf).pow(2).mean().sqrt()),
            }
        )
    return pd.DataFrame(rows)

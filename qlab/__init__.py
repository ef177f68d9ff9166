"""qlab — a quantization and compression analysis workbench for small language models.

``import qlab`` is light: the functions below load their modules on first use.

    report = qlab.entropy("model.safetensors")    # per-tensor entropy, predicted bytes
    table = qlab.analyze("model.safetensors")     # per-matrix spectra, like ww.analyze
    state = qlab.quantize("model.safetensors", policy="record_small", out="m.qlab")
    result = qlab.quantize_checkpoint("runs/tiny", "record_small")  # calibrate, quantize, evaluate
"""

from __future__ import annotations

import importlib
from typing import Any

from qlab._version import __version__

__all__ = [
    "load",
    "entropy",
    "analyze",
    "quantize",
    "sweep",
    "quantize_checkpoint",
    "Workspace",
    "__version__",
]

_LAZY = {
    "load": "qlab.api",
    "entropy": "qlab.api",
    "analyze": "qlab.api",
    "quantize": "qlab.api",
    "sweep": "qlab.api",
    "quantize_checkpoint": "qlab.eval.quantize",
    "Workspace": "qlab.figures.workspace",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'qlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

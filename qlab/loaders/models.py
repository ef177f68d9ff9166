"""Models from files: a run directory's GPT, and qlab artifacts written and read back.

The top of the data path (with :mod:`qlab.loaders.readers`): it builds a
:class:`~qlab.model.gpt.GPT` from a stored config and fills it, so it sits above the
model, quantization and container layers it combines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlab.compress.container import read_artifact, write_artifact
from qlab.config import ModelConfig
from qlab.errors import ArtifactError, CheckpointError, ConfigError, QlabError, QuantError
from qlab.io.checkpoint import load_checkpoint, load_weights
from qlab.model.gpt import GPT
from qlab.quant.model_quant import QuantizedModel, load_dequantized, model_extra
from qlab.quant.policy import Policy

__all__ = ["load_model", "save_quantized", "load_quantized", "LoadedArtifact"]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild the GPT of a run directory with its saved (EMA) weights: (model, ModelConfig)."""
    state, cfg = load_checkpoint(path)
    try:
        model_config = ModelConfig.from_dict(cfg["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: config.json 'model' does not describe a valid model ({exc})") from exc
    model = GPT(model_config)
    load_weights(model, state, str(path))
    if cfg.get("looping") and model_config.loop_layers is not None:
        model.set_looping(True)
    return model.to(device), model_config


def save_quantized(
    path: str | os.PathLike,
    qm: QuantizedModel,
    policy: Policy,
    *,
    codec: str = "brotli-11",
    extra: dict | None = None,
) -> Path:
    """Write ``qm`` as a qlab artifact whose header carries the model config (atomic)."""
    head = model_extra(qm.dequantized_model, qm.meta.get("aliases"), **(extra or {}))
    return write_artifact(path, qm.quantized_state, policy=policy.to_dict(), codec=codec, extra=head)


@dataclass
class LoadedArtifact:
    """A model rebuilt from a qlab artifact: the model, its stored entries and the header."""

    model: nn.Module
    entries: dict[str, Any]
    header: dict[str, Any]


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> LoadedArtifact:
    """Read an artifact and load its dequantized weights into ``model`` or a GPT rebuilt from
    the ``model_config`` in the header (ArtifactError when neither is available)."""
    entries, header = read_artifact(path)
    extra = header.get("extra") or {}
    if model is None:
        model = _model_from_extra(extra, path)
    try:
        load_dequantized(model, entries, extra.get("aliases"), where=str(path))
    except (CheckpointError, QuantError) as exc:
        raise ArtifactError(f"{path}: stored tensors do not fit the model ({exc})") from exc
    return LoadedArtifact(model, entries, header)


def _model_from_extra(extra: Mapping, path) -> nn.Module:
    if "model_config" not in extra:
        raise ArtifactError(
            f"{path}: the artifact header holds no model_config; pass the model to load it into"
        )
    try:
        model = GPT(ModelConfig.from_dict(extra["model_config"]))
        if extra.get("looping"):
            model.set_looping(True)
    except QlabError as exc:
        raise ArtifactError(f"{path}: header model_config is not a valid model ({exc})") from exc
    return model

"""The shared, cached inputs of every figure: a checkpoint, its data, its quantized copy.

A :class:`Workspace` builds each input once, on first use: the checkpoint (the given run
directory, or the ``tiny`` preset trained on the embedded corpus at the scale's size),
the validation tokens and byte tables, Hessians for the figures' weight policy and the
GPTQ-quantized model. Measured tables are cached as JSON under the work directory, keyed
by the scale and the checkpoint, so notebooks, ``qlab figures`` and the tests share them
and a second run only redraws.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from qlab.analysis.rd import bpb_eval_fn
from qlab.analysis.spectra import weight_family
from qlab.data import DatasetInfo, default_dataset
from qlab.data.corpus import default_cache_dir
from qlab.errors import CheckpointError, DataError
from qlab.eval.context import EvalContext
from qlab.figures.scale import Scale, get_scale
from qlab.io.atomic import atomic_write_text
from qlab.io.checkpoint import committed_file, has_checkpoint, read_config
from qlab.loaders.readers import detect_format, load_state_dict
from qlab.progress import resolve_progress
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import Policy, get_policy
from qlab.train.config import resolve_configs
from qlab.train.trainer import train

__all__ = ["Workspace", "figure_policy", "SMALL_MODEL_POLICY"]

#: The record's recipe (int6 SDClip k = 12.85 GPTQ on matrices, int8 k = 20 embedding) with
#: the "large matrix" floor lowered to 4,096 elements: the record policy only GPTQs tensors
#: with more than 65,536 elements, which CPU-sized models hardly have.
SMALL_MODEL_POLICY = "record_small"


def figure_policy() -> Policy:
    """The weight policy of the figures (:data:`SMALL_MODEL_POLICY`)."""
    return get_policy(SMALL_MODEL_POLICY)


def _checkpoint_key(path: Path) -> str:
    """Path + size + mtime of the weights: a retrained checkpoint gets a fresh cache."""

    detect_format(path)  # a path qlab cannot read fails here, naming the formats it can
    try:
        if has_checkpoint(path):
            files = [committed_file(path, "model.safetensors")]
        elif path.is_dir():  # e.g. a Hugging Face directory: every file qlab could read
            files = sorted(f for f in path.iterdir() if f.is_file())
        else:
            files = [path]
        stats = [(f.name, f.stat()) for f in files]
    except (OSError, CheckpointError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc})") from exc
    blob = f"{path.resolve()}|" + "|".join(f"{n}:{st.st_size}:{st.st_mtime_ns}" for n, st in stats)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


class Workspace:
    """Lazily built, cached inputs of the figures for one checkpoint at one scale."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        scale: str | Scale = "default",
        *,
        data: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
    ) -> None:
        self.scale = get_scale(scale)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.data = data
        self.progress = resolve_progress(progress)  # None: bars in a notebook or terminal
        tag = (
            "tiny-" + self._train_key()
            if self.checkpoint is None
            else "ckpt-" + _checkpoint_key(self.checkpoint)
        )
        if data is not None and str(data) != "embedded":
            tag += "-data-" + hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:8]
        root = Path(work_dir) if work_dir is not None else default_cache_dir() / "figures"
        self.work = root / f"{self.scale.name}-{tag}"
        self._tables: dict[str, pd.DataFrame] = {}
        self.memo: dict[str, Any] = {}  # in-memory results too big or too rich for the table cache

    # ---- checkpoint and data --------------------------------------------------------------
    @functools.cached_property
    def weights_only(self) -> bool:
        """True for a checkpoint that is not a qlab run directory (safetensors, a Hugging
        Face directory, a state dict, an artifact): weights, but no model or data."""

        return self.checkpoint is not None and not has_checkpoint(self.checkpoint)

    @property
    def weights_path(self) -> Path:
        """Where the weights are: the weights file or directory, else the run directory."""
        return self.checkpoint if self.checkpoint is not None and self.weights_only else self.run_dir

    @functools.cached_property
    def run_dir(self) -> Path:
        """The checkpoint's run directory; trains the scale's ``tiny`` run when none was given."""
        if self.checkpoint is not None:
            if self.weights_only:
                raise CheckpointError(
                    f"{self.checkpoint}: weights only (not a qlab run directory); this figure needs a "
                    "model and its data — `qlab figures --list` marks the figures that need only weights"
                )
            return self.checkpoint
        return self._train()

    def _configs(self, data: str, out_dir: str) -> tuple[Any, Any]:
        """The ``tiny`` preset with the scale's overrides (no environment variables)."""

        vocab = int(self.scale.model.get("vocab_size", 1024))
        overrides = {**self.scale.train, "data": data, "out_dir": out_dir}
        return resolve_configs("tiny", overrides, {**self.scale.model, "vocab_size": vocab}, env={})

    def _train_key(self) -> str:
        """Hash of the scale and the resolved training + model configuration: a changed
        preset or scale trains (and measures) afresh instead of reusing a stale run."""
        tc, mc = self._configs("embedded", "run")
        blob = json.dumps(
            [self.scale.key(), tc.to_dict(), dataclasses.asdict(mc)], sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def _train(self) -> Path:
        run_dir = self.work / "run"
        data = self._embedded(int(self.scale.model.get("vocab_size", 1024)))
        tc, mc = self._configs(str(data.root), str(run_dir))
        if has_checkpoint(run_dir) and read_config(run_dir).get("step") == tc.iterations:
            return run_dir
        train(tc, mc, resume=has_checkpoint(run_dir), progress=self.progress)
        return run_dir

    @staticmethod
    def _embedded(vocab: int) -> Any:
        return default_dataset(vocab_size=vocab)

    @functools.cached_property
    def context(self) -> EvalContext:
        """The run's model (in eval mode) with ``data`` — when None, the run's own dataset
        directory while it exists, else the embedded corpus."""
        ctx = EvalContext.open(self.run_dir, self.data)
        ctx.model.eval()
        return ctx

    @property
    def model(self) -> nn.Module:
        return self.context.model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def seq_len(self) -> int:
        return int(self.config.eval_seq_len)

    @property
    def dataset(self) -> DatasetInfo:
        return self.context.data

    @property
    def val_tokens(self) -> torch.Tensor:
        return self.context.val_tokens

    @property
    def byte_tables(self) -> Any:
        return self.context.byte_tables

    @property
    def eval_tokens(self) -> int | None:
        """Validation tokens each measurement scores (None = all)."""
        return self.scale.eval_tokens or None

    def eval_fn(self, seq_len: int | None = None) -> Callable[[nn.Module], float]:
        """``model -> val_bpb`` on the scale's validation slice."""

        return bpb_eval_fn(
            self.val_tokens, self.byte_tables, seq_len=seq_len or self.seq_len, max_tokens=self.eval_tokens
        )

    @functools.cached_property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every floating-point tensor as fp32: the model's, or the weights file's."""
        if self.weights_only:
            sd = load_state_dict(self.weights_path)
        else:
            sd = self.model.state_dict()
        return {n: t.detach().float().clone() for n, t in sd.items() if t.is_floating_point()}

    def largest_matrix(self, exclude_embedding: bool = True) -> tuple[str, torch.Tensor]:
        """The biggest 2-D weight (by elements), the embedding left out unless asked."""

        mats = {
            n: t
            for n, t in self.state_dict.items()
            if t.dim() == 2 and not (exclude_embedding and weight_family(n) == "embedding")
        }
        if not mats:
            raise DataError(f"{self.checkpoint or self.run_dir}: the checkpoint has no 2-D weight matrices")
        name = max(mats, key=lambda n: mats[n].numel())
        return name, mats[name]

    # ---- quantization ---------------------------------------------------------------------
    @functools.cached_property
    def policy(self) -> Policy:
        return figure_policy()

    def calibration(self) -> list[torch.Tensor]:
        return self.context.calibration(self.scale.calib_batches)

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """Hessians of the figure policy's GPTQ tensors (the record's calibration recipe)."""
        return self.context.hessians(self.policy, self.scale.calib_batches, progress=self.progress)

    @functools.cached_property
    def quantized(self) -> Any:
        """The model quantized by :attr:`policy` with GPTQ (a QuantizedModel)."""

        qm = quantize_model(self.model, self.policy, hessians=self.hessians, progress=self.progress)
        qm.meta["calib_batches"] = self.scale.calib_batches
        return qm

    # ---- table cache ----------------------------------------------------------------------
    def table(self, name: str, build: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """``build()`` once per workspace: kept in memory and as JSON under ``work/tables``."""
        if name in self._tables:
            return self._tables[name].copy()
        path = self.work / "tables" / f"{name}.json"
        if path.is_file():
            try:
                df = pd.read_json(io.StringIO(path.read_text(encoding="utf-8")), orient="table")
            except ValueError:
                df = None  # a damaged cache entry is rebuilt
            if df is not None:
                self._tables[name] = df
                return df.copy()
        df = build()
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"figure table {name!r}: builder returned {type(df).__name__}, not a DataFrame")
        df = df.reset_index(drop=True)
        atomic_write_text(path, df.to_json(orient="table", index=False, default_handler=str))
        self._tables[name] = df
        return df.copy()

    def __repr__(self) -> str:
        ckpt = self.checkpoint or "embedded tiny run"
        return f"Workspace(checkpoint={ckpt}, scale={self.scale.name!r}, work={self.work})"

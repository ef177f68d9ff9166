"""One evaluation context: a model and everything scoring, calibrating or GPTQ needs.

Every qlab workflow that measures a checkpoint needs the same things besides the weight
policy: the model, the dataset, its validation tokens and byte tables, calibration
batches from its training shards and the Hessians they give. :class:`EvalContext` opens
them from any checkpoint qlab reads and builds each on first use, once::

    ctx = EvalContext.open("runs/demo/runs/tiny", "embedded")
    ctx.evaluate().val_bpb                 # the float model, cached per setting
    ctx.hessians(get_policy("record"))     # collected once, shared by later policies

``resolve_model``, ``resolve_dataset`` and ``validation_inputs`` are the pieces it is made
of; the trainer, which scores a model it is still training, calls ``validation_inputs``
directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlab.config import ModelConfig
from qlab.data import (
    DatasetInfo,
    build_byte_tables,
    default_dataset,
    load_tokenizer,
    load_validation_tokens,
    open_dataset,
)
from qlab.data.tokenizer import BOS_ID
from qlab.errors import ConfigError
from qlab.eval.agreement import agreement_summary, token_agreement
from qlab.eval.bpb import EvalResult, evaluate_bpb
from qlab.io.checkpoint import has_checkpoint, load_weights, read_config
from qlab.loaders import load_model, load_quantized
from qlab.loaders.readers import detect_format, load_state_dict
from qlab.model.gpt import GPT
from qlab.model.infer import infer_model_config
from qlab.quant.model_quant import calibration_batches, gptq_names, model_hessians
from qlab.quant.policy import Policy

__all__ = ["EvalContext", "resolve_dataset", "resolve_model", "validation_inputs"]


def resolve_model(
    model_or_ckpt: nn.Module | str | os.PathLike, preset: str | None = None
) -> tuple[nn.Module, str]:
    """A model and a label: a module as is, a qlab run directory via ``load_model`` (with
    its depth-recurrence mode restored), a qlab artifact via its header's model config, or
    any other checkpoint of qlab's GPT (the record's ``final_model.pt`` and ``.int6.ptz``,
    safetensors) with its configuration inferred from the shapes, defaults from ``preset``
    (``record`` when None)."""
    if isinstance(model_or_ckpt, nn.Module):
        return model_or_ckpt, type(model_or_ckpt).__name__
    path = Path(model_or_ckpt)
    fmt = detect_format(path)
    if fmt == "qlab-run":
        model, _ = load_model(path)
        return model, str(path)
    if fmt == "qlab-artifact":
        return load_quantized(path).model, str(path)
    state = load_state_dict(path)
    config = infer_model_config({k: tuple(v.shape) for k, v in state.items()}, preset or "record", str(path))
    gpt = GPT(config)
    load_weights(gpt, {k: v.to(gpt.state_dict()[k].dtype) for k, v in state.items()}, str(path))
    # A state dict does not say whether depth recurrence was on: the records' final
    # weights were trained with it switched on for the second half, so it is on here.
    if config.loop_layers is not None:
        gpt.set_looping(True)
    return gpt, f"{path} (config inferred from shapes, preset {preset or 'record'})"


def resolve_dataset(dataset: Any, vocab_size: int | None) -> DatasetInfo:
    """A DatasetInfo from a DatasetInfo, a directory, or ``"embedded"`` / None (the
    embedded corpus at ``vocab_size``, built once and cached)."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset is None or str(dataset) == "embedded":
        if vocab_size is None:
            raise ConfigError(
                "the embedded corpus needs a vocabulary size: pass a dataset directory, or a model "
                "whose config has vocab_size"
            )
        return default_dataset(vocab_size=vocab_size)
    return open_dataset(dataset)


def validation_inputs(
    data: DatasetInfo,
    seq_len: int,
    vocab_size: int | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, Any]:
    """(validation tokens, byte tables) of a dataset for a model of ``vocab_size`` (default:
    the dataset's), with its tokenizer or ``tokenizer_path``: what every bpb evaluation
    needs besides the model."""
    val = load_validation_tokens(data.val_files, seq_len, vocab_size=data.vocab_size)
    sp = load_tokenizer(tokenizer_path or data.tokenizer_path)
    return val, build_byte_tables(sp, vocab_size or data.vocab_size)


def recorded_dataset(ckpt: str | os.PathLike) -> str | None:
    """The dataset directory a qlab run was trained on, while it still exists (else None)."""
    path = Path(ckpt)
    if not has_checkpoint(path):
        return None
    data = read_config(path).get("train", {}).get("data")
    return data if isinstance(data, str) and data != "embedded" and Path(data).is_dir() else None


def _config(model: nn.Module) -> ModelConfig | None:
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, ModelConfig) else None


@dataclass(eq=False)
class EvalContext:
    """A model with its dataset and the lazily built, cached inputs of every measurement.

    ``seq_len`` is the evaluation length (default: the model's ``eval_seq_len``);
    ``calib_seq_len`` the calibration length (default: its ``train_seq_len``, as the
    records calibrate). A model without a qlab config needs ``seq_len`` and a dataset.
    """

    model: nn.Module
    data: DatasetInfo
    label: str
    seq_len: int
    calib_seq_len: int
    tokenizer_path: str | os.PathLike | None = None
    _validation: tuple[torch.Tensor, Any] | None = field(default=None, init=False, repr=False)
    _batches: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _hessians: dict[tuple[int, int], dict[str, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )
    _tried: dict[tuple[int, int], set[str]] = field(default_factory=dict, init=False, repr=False)
    _scores: dict[tuple, EvalResult] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def open(
        cls,
        ckpt: nn.Module | str | os.PathLike,
        data: Any = None,
        seq_len: int | None = None,
        *,
        preset: str | None = None,
        calib_seq_len: int | None = None,
        tokenizer_path: str | os.PathLike | None = None,
    ) -> EvalContext:
        """Open ``ckpt`` (a module or any checkpoint :func:`resolve_model` reads) with
        ``data``: a DatasetInfo, a dataset directory, ``"embedded"``, or None — a qlab run's
        own dataset directory while it exists, else the embedded corpus."""
        model, label = resolve_model(ckpt, preset=preset)
        if data is None and not isinstance(ckpt, nn.Module):
            data = recorded_dataset(ckpt)
        cfg = _config(model)
        vocab = cfg.vocab_size if cfg is not None else None
        dataset = resolve_dataset(data, vocab)
        if vocab is not None and dataset.vocab_size > vocab:
            raise ConfigError(f"dataset vocab {dataset.vocab_size} exceeds the model's vocab {vocab}")
        seq_len = seq_len or (cfg.eval_seq_len if cfg is not None else None)
        if not seq_len:
            raise ConfigError(f"{label}: seq_len is needed for a model without a qlab config")
        calib = calib_seq_len or (cfg.train_seq_len if cfg is not None else seq_len)
        return cls(model, dataset, label, int(seq_len), int(calib), tokenizer_path)

    @property
    def config(self) -> ModelConfig | None:
        return _config(self.model)

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary (None for a model without a qlab config)."""
        cfg = self.config
        return cfg.vocab_size if cfg is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- validation ------------------------------------------------------------------
    def validation(self) -> tuple[torch.Tensor, Any]:
        """(validation tokens, byte tables), loaded on first use."""
        if self._validation is None:
            vocab, tok = self.vocab_size, self.tokenizer_path
            self._validation = validation_inputs(self.data, self.seq_len, vocab, tok)
        return self._validation

    @property
    def val_tokens(self) -> torch.Tensor:
        return self.validation()[0]

    @property
    def byte_tables(self) -> Any:
        return self.validation()[1]

    def evaluate(self, model: nn.Module | None = None, **settings: Any) -> EvalResult:
        """``evaluate_bpb`` of ``model`` (default: the context's own) on the validation
        tokens at ``seq_len``; the context's own model is scored once per setting."""
        val, tables = self.validation()
        if model is not None and model is not self.model:
            return evaluate_bpb(model, val, tables, seq_len=self.seq_len, **settings)
        key = tuple(sorted((k, v) for k, v in settings.items() if k != "progress"))
        if key not in self._scores:
            self._scores[key] = evaluate_bpb(self.model, val, tables, seq_len=self.seq_len, **settings)
        return self._scores[key]

    def agreement(
        self, model: nn.Module, reference: nn.Module | None = None, n_boot: int = 1000, **settings: Any
    ) -> dict[str, float]:
        """:func:`~qlab.eval.agreement.agreement_summary` of ``model`` against ``reference``
        (default: the context's own model) on the validation tokens at ``seq_len``:
        KL, top-1 agreement and Δbpb with document-bootstrap intervals."""
        val, tables = self.validation()
        ref = self.model if reference is None else reference
        ta = token_agreement(model, ref, val, tables, seq_len=self.seq_len, **settings)
        return agreement_summary(ta, val, BOS_ID, n_boot=n_boot)

    # ---- calibration -----------------------------------------------------------------
    def calibration(self, n_batches: int = 64, batch_seqs: int = 8) -> list[torch.Tensor]:
        """``n_batches`` training batches of ``batch_seqs`` × ``calib_seq_len`` tokens (the
        shuffled loader, seed 0), on the model's device."""
        key = (n_batches, batch_seqs)
        if key not in self._batches:
            batches = calibration_batches(
                self.data, n_batches, seq_len=self.calib_seq_len, batch_seqs=batch_seqs
            )
            self._batches[key] = [b.to(self.device) for b in batches]  # the hooks run where the model is
        return self._batches[key]

    def hessians(
        self, policy: Policy, n_batches: int = 64, batch_seqs: int = 8, *, progress: bool = False
    ) -> dict[str, torch.Tensor]:
        """Hessians of ``policy``'s GPTQ tensors from :meth:`calibration`; collected once
        per calibration set and shared by every policy that needs the same tensors."""
        key = (n_batches, batch_seqs)
        have = self._hessians.setdefault(key, {})
        tried = self._tried.setdefault(key, set())
        names = gptq_names(self.model.state_dict(), policy)
        if not set(names) <= tried:
            batches = self.calibration(n_batches, batch_seqs)
            have.update(model_hessians(self.model, policy, batches, progress=progress))
            tried.update(names)  # a tensor no hook reaches is not looked for again
        return {n: have[n] for n in names if n in have}

"""What a training run is built from before its first step: the device, the training
data, the loader the config names, and the check that a resumed run keeps its trajectory."""

from __future__ import annotations

from typing import Any

import torch

from qlab.config import ModelConfig
from qlab.data import default_dataset, open_dataset
from qlab.data.loader import ShuffledSequenceLoader
from qlab.data.record_loader import RecordSequenceLoader
from qlab.errors import ConfigError
from qlab.train import distributed as D
from qlab.train.config import TrainConfig

__all__ = [
    "RESUMABLE_CHANGES",
    "build_loader",
    "check_resume_compatible",
    "open_training_data",
    "resolve_device",
]

# Fields that may differ between a run and its resumption without changing its trajectory.
RESUMABLE_CHANGES = {
    "iterations", "max_wallclock_seconds", "val_every", "val_max_tokens", "val_batch_seqs", "eval_stride",
    "log_every", "checkpoint_every", "compile", "device", "data", "tokenizer_path", "out_dir", "grad_accum",
    "final_sliding", "sliding_stride",
}  # fmt: skip


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available")
    return name


def open_training_data(config: TrainConfig, vocab_size: int):
    """The DatasetInfo to train on; the embedded corpus is built by rank 0 first (cache)."""

    def load():
        if config.data == "embedded":
            return default_dataset(vocab_size=vocab_size)
        return open_dataset(config.data)

    if not D.is_main():
        D.barrier()
    info = load()
    if D.is_main():
        D.barrier()
    if info.vocab_size != vocab_size:
        raise ConfigError(
            f"model vocab_size={vocab_size} but dataset {info.root} has vocab_size={info.vocab_size} "
            "(set VOCAB_SIZE / --vocab-size to match)"
        )
    return info


def check_resume_compatible(saved: dict[str, Any], config: TrainConfig, model_config: ModelConfig) -> None:
    """ConfigError listing the fields whose change would alter a resumed run's trajectory."""
    if saved["model"] != model_config.to_dict():
        diff = sorted(k for k, v in model_config.to_dict().items() if saved["model"].get(k) != v)
        raise ConfigError(f"--resume: model config differs from the checkpoint's in {diff}")
    saved_train = saved.get("train", {})
    diff = sorted(
        k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved_train.get(k, v) != v
    )
    if diff:
        raise ConfigError(f"--resume: train config differs from the checkpoint's in {diff}")


def build_loader(config: TrainConfig, files, rank: int, world: int):
    """The training loader ``config.loader`` names: qlab's seeded stream or the record's order."""
    if config.loader == "record":
        return RecordSequenceLoader(files, config.train_seq_len, rank, world)
    return ShuffledSequenceLoader(files, config.train_seq_len, rank, world, config.seed)

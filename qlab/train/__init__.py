"""Training: Muon + AdamW, EMA, schedules, the DDP-ready loop, and the regularizer hook.

``train(TrainConfig, ModelConfig) -> TrainResult`` is the entry point; ``qlab train`` is
its CLI. Regularizers plug in through ``register_regularizer`` (``qlab.train.regularizers``).
"""

from qlab.train.config import TrainConfig, resolve_configs, train_preset
from qlab.train.ema import EMA
from qlab.train.muon import Muon, zeropower_ns5
from qlab.train.optim import Optimizers, build_optimizers
from qlab.train.regularizers import REGULARIZERS, build_regularizers, register_regularizer
from qlab.train.trainer import TrainResult, train

__all__ = [
    "EMA",
    "REGULARIZERS",
    "Muon",
    "Optimizers",
    "TrainConfig",
    "TrainResult",
    "build_optimizers",
    "build_regularizers",
    "register_regularizer",
    "resolve_configs",
    "train",
    "train_preset",
    "zeropower_ns5",
]

"""Small model and training configs shared by the trainer tests (fast on one CPU thread)."""

from __future__ import annotations

from qlab.config import ModelConfig, get_preset
from qlab.train.config import TrainConfig

SEQ = 32


def model_config(vocab: int, loop: bool = True) -> ModelConfig:
    return get_preset("tiny").replace(
        vocab_size=vocab, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, rope_dims=8,
        loop_layers=(1,) if loop else None, loop_repeats=2, train_seq_len=SEQ, eval_seq_len=SEQ,
    )  # fmt: skip


def train_config(data, out, **kw) -> TrainConfig:
    base = dict(
        iterations=6, train_batch_tokens=SEQ * 4, train_seq_len=SEQ, grad_accum=2, max_wallclock_seconds=0.0,
        gptq_reserve_seconds=0.0, warmup_steps=0, muon_momentum_warmup_steps=4, val_every=0,
        val_max_tokens=SEQ * 8 + 1, val_batch_seqs=8, log_every=1, checkpoint_every=0, device="cpu",
        data=str(data.root), out_dir=str(out), ema_decay=0.9,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})

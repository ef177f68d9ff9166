"""The training loop in-process: learning, discarded warm-up, resume, regularizer hook, caps."""

from __future__ import annotations

import pytest
import torch
from trainkit import SEQ, model_config, train_config

from qlab.errors import ConfigError
from qlab.io import checkpoint as ckpt
from qlab.io.runlog import read_runlog
from qlab.loaders import load_model
from qlab.train.regularizers import REGULARIZERS, register_regularizer
from qlab.train.schedule import lr_multiplier
from qlab.train.trainer import train


def raw_weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.resume_state(run_dir)["model"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trains_logs_and_checkpoints(tiny_dataset, tmp_path):
    cfg = train_config(tiny_dataset, tmp_path / "run", iterations=8, checkpoint_every=4, val_every=4)
    result = train(cfg, model_config(tiny_dataset.vocab_size), progress=False)
    assert result.steps == 8 and result.stopped_by == "iterations"
    assert result.tokens_seen == 8 * SEQ * 4 and result.tokens_per_second > 0
    log = read_runlog(tmp_path / "run")
    steps = log[log.kind == "train"]
    assert list(steps.step) == list(range(1, 9))
    assert steps.train_loss.iloc[-1] < steps.train_loss.iloc[0]  # it learns
    # looping switched on at half of training; LR warms down to a small multiple at the end
    assert not steps.looping.iloc[0] and steps.looping.iloc[-1]
    assert steps.lr_mult.iloc[0] == 1.0 and steps.lr_mult.iloc[-1] < 0.3
    assert list(log[log.kind == "val"].step) == [4]
    final = log[log.kind == "final"].iloc[0]
    assert final.val_bpb == pytest.approx(result.val_bpb) and final.weights == "ema"
    model, _ = load_model(tmp_path / "run")
    assert model.config.vocab_size == tiny_dataset.vocab_size


def test_warmup_steps_are_discarded(tiny_dataset, tmp_path):
    mc = model_config(tiny_dataset.vocab_size)
    train(train_config(tiny_dataset, tmp_path / "a", iterations=3, warmup_steps=0), mc, progress=False)
    train(train_config(tiny_dataset, tmp_path / "b", iterations=3, warmup_steps=2), mc, progress=False)
    assert_same(raw_weights(tmp_path / "a"), raw_weights(tmp_path / "b"))


def test_resume_reaches_the_uninterrupted_weights(tiny_dataset, tmp_path):
    # Cut the run short by iterations (which is allowed to change on resume); the
    # warm-down and loop switch are step-fraction based, so disable them here — the
    # SIGKILL test in test_train_resume.py covers a real interruption with them on.
    mc = model_config(tiny_dataset.vocab_size, loop=False)
    full = train_config(tiny_dataset, tmp_path / "full", iterations=5, warmdown_frac=0.0)
    train(full, mc, progress=False)
    part = train_config(tiny_dataset, tmp_path / "part", iterations=2, warmdown_frac=0.0)
    train(part, mc, progress=False)
    train(part.replace(iterations=5), mc, resume=True, progress=False)
    assert_same(raw_weights(tmp_path / "full"), raw_weights(tmp_path / "part"))
    assert_same(ckpt.load_checkpoint(tmp_path / "full")[0], ckpt.load_checkpoint(tmp_path / "part")[0])
    assert list(read_runlog(tmp_path / "part").query("kind == 'train'").step) == [1, 2, 3, 4, 5]


def test_refuses_to_overwrite_or_resume_a_different_run(tiny_dataset, tmp_path):
    mc = model_config(tiny_dataset.vocab_size, loop=False)
    cfg = train_config(tiny_dataset, tmp_path / "run", iterations=1)
    train(cfg, mc, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, mc, progress=False)
    with pytest.raises(ConfigError, match="matrix_lr"):
        train(cfg.replace(matrix_lr=0.5), mc, resume=True, progress=False)
    with pytest.raises(ConfigError, match="model_dim"):
        train(cfg, mc.replace(model_dim=64, num_heads=4), resume=True, progress=False)
    with pytest.raises(ConfigError, match="vocab_size"):
        train(cfg.replace(out_dir=str(tmp_path / "v")), mc.replace(vocab_size=100), progress=False)


def test_regularizer_hook_adds_and_logs_terms(tiny_dataset, tmp_path):
    seen = {}

    @register_regularizer("_test_hidden_l2")
    def hidden_l2(hidden, model):
        seen["shape"] = tuple(hidden.shape)
        return hidden.float().pow(2).mean()

    try:
        mc = model_config(tiny_dataset.vocab_size, loop=False)
        cfg = train_config(tiny_dataset, tmp_path / "reg", iterations=2, regs={"_test_hidden_l2": 0.5})
        train(cfg, mc, progress=False)
        train(cfg.replace(out_dir=str(tmp_path / "plain"), regs={}), mc, progress=False)
    finally:
        REGULARIZERS.pop("_test_hidden_l2", None)
    assert seen["shape"] == (2, SEQ, 32)  # micro-batch of 2 sequences, hidden size 32
    log = read_runlog(tmp_path / "reg").query("kind == 'train'")
    # RMS-normed hidden states have mean square ≈ 1
    assert log["reg__test_hidden_l2"].between(0.5, 1.5).all()
    plain = read_runlog(tmp_path / "plain").query("kind == 'train'")
    assert log.train_loss.iloc[0] == pytest.approx(plain.train_loss.iloc[0], rel=1e-5)  # ce logged apart
    w_reg, w_plain = raw_weights(tmp_path / "reg"), raw_weights(tmp_path / "plain")
    assert not torch.equal(w_reg["blocks.0.mlp.fc.weight"], w_plain["blocks.0.mlp.fc.weight"])


def test_wallclock_cap_stops_training(tiny_dataset, tmp_path):
    cfg = train_config(
        tiny_dataset, tmp_path / "wc", iterations=10_000, max_wallclock_seconds=1.5, gptq_reserve_seconds=0.5
    )
    result = train(
        cfg.replace(warmdown_frac=1.0), model_config(tiny_dataset.vocab_size, loop=False), progress=False
    )
    assert result.stopped_by == "wallclock"
    assert 1.0 <= result.train_seconds < 5.0 and 0 < result.steps < 10_000
    log = read_runlog(tmp_path / "wc").query("kind == 'train'")
    # Each step's LR comes from the wallclock fraction at its start (the previous record's
    # elapsed time over the 1 s budget), not from the step fraction of 10,000 iterations.
    before = [0.0, *log.elapsed.iloc[:-1]]
    expected = [lr_multiplier(min(t / 1.0, 1.0), 1.0) for t in before]
    assert log.lr_mult.tolist() == pytest.approx(expected)
    assert log.lr_mult.iloc[-1] < 1.0

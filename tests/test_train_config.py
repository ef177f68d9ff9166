"""TrainConfig: presets, Parameter Golf environment variables, precedence, validation, regs."""

from __future__ import annotations

import pytest

from qlab.errors import ConfigError
from qlab.train.config import (
    REGULARIZERS,
    TrainConfig,
    build_regularizers,
    register_regularizer,
    resolve_configs,
)


def test_record_defaults_are_the_papers_numbers():
    c = TrainConfig()
    assert (c.matrix_lr, c.muon_wd, c.embed_lr, c.embed_wd, c.scalar_lr, c.scalar_wd) == (
        0.02, 0.085, 0.03, 0.085, 0.02, 0.02,
    )  # fmt: skip
    assert (c.muon_momentum_warmup_start, c.muon_momentum, c.muon_momentum_warmup_steps) == (0.92, 0.99, 1500)
    assert (c.grad_clip, c.ema_decay, c.warmdown_frac, c.warmup_steps) == (0.3, 0.997, 0.667, 20)
    assert c.train_batch_tokens == 2048 * 48 * 8
    assert c.grad_accum_for(1) == 8 and c.grad_accum_for(8) == 1 and c.grad_accum_for(16) == 1
    assert c.seqs_per_rank(8) == 48


def test_env_overrides_preset_and_cli_overrides_env():
    env = {"ITERATIONS": "123", "MATRIX_LR": "0.05", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1"}
    train, model = resolve_configs("tiny", {"iterations": 7}, {}, env)
    assert train.iterations == 7  # CLI wins
    assert train.matrix_lr == 0.05  # env beats the preset
    assert model.model_dim == 64 and model.num_heads == 2
    assert train.train_batch_tokens == 4096  # tiny preset value untouched
    assert model.train_seq_len == train.train_seq_len


def test_pg_specific_names():
    env = {
        "ITERATIONS": "1000", "WARMDOWN_ITERS": "250", "RUN_ID": "abc", "ENABLE_LOOPING_AT": "0.35",
        "TIED_EMBED_LR": "0.04", "ADAM_WD": "0.01", "EMA_DECAY": "0", "MUON_ROW_NORMALIZE": "0",
    }  # fmt: skip
    train, model = resolve_configs("tiny", {}, {}, env)
    assert train.warmdown_frac == 0.25
    assert train.out_dir.endswith("runs/abc")
    assert model.loop_start_frac == 0.35
    assert train.embed_lr == 0.04 and train.scalar_wd == 0.01 and train.ema_decay == 0.0
    assert train.muon_row_normalize is False


@pytest.mark.parametrize(
    "var,value", [("ITERATIONS", "ten"), ("MATRIX_LR", "nan"), ("COMPILE", "maybe"), ("MODEL_DIM", "1.5")]
)
def test_malformed_env_names_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        resolve_configs("tiny", {}, {}, {var: value})


def test_invalid_values_name_the_field():
    with pytest.raises(ConfigError, match="warmdown_frac"):
        TrainConfig(warmdown_frac=1.5)
    with pytest.raises(ConfigError, match="autocast"):
        TrainConfig(autocast="fp8")
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig(train_batch_tokens=1000, train_seq_len=64).seqs_per_rank(1)
    with pytest.raises(ConfigError, match="unknown train config"):
        TrainConfig.from_dict({"bogus": 1})


def test_dict_roundtrip():
    c = TrainConfig(regs={"aos": 0.1}, grad_accum=2)
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_regularizer_registry():
    name = "_test_reg_l2"

    @register_regularizer(name)
    def l2(hidden, model):
        return hidden.pow(2).mean()

    try:
        regs = build_regularizers({name: 0.5})
        assert regs == [(name, 0.5, l2)]
        assert build_regularizers({name: 0.0}) == []
        assert build_regularizers({name.upper(): 1.0}) == [(name, 1.0, l2)]  # names match case-insensitively
        with pytest.raises(ConfigError, match="unknown regularizer"):
            build_regularizers({"no_such_reg": 1.0})
        with pytest.raises(ConfigError, match="twice"):
            register_regularizer(name)(lambda h, m: h.sum())
    finally:
        REGULARIZERS.pop(name, None)

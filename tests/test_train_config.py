"""TrainConfig: presets, Parameter Golf environment variables, precedence, validation, regs."""

from __future__ import annotations

import math

import pytest

from qlab.errors import ConfigError
from qlab.train.config import TrainConfig, resolve_configs
from qlab.train.regularizers import REGULARIZERS, build_regularizers, register_regularizer


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


# The environment a PR #1394 command line sets (every name its Hyperparameters reads).
RECORD_ENV = {
    "DATA_DIR": "./data/", "SEED": "42", "RUN_ID": "seed42", "ITERATIONS": "20000", "WARMDOWN_FRAC": "0.667",
    "WARMUP_STEPS": "20", "TRAIN_BATCH_TOKENS": "786432", "TRAIN_SEQ_LEN": "2048", "TRAIN_LOG_EVERY": "500",
    "MAX_WALLCLOCK_SECONDS": "600", "VAL_BATCH_TOKENS": "524288", "EVAL_SEQ_LEN": "2048",
    "VAL_LOSS_EVERY": "4000", "SLIDING_WINDOW_ENABLED": "1", "VOCAB_SIZE": "8192", "NUM_LAYERS": "11",
    "XSA_LAST_N": "11", "MODEL_DIM": "512", "EMBEDDING_DIM": "512", "NUM_KV_HEADS": "4", "NUM_HEADS": "8",
    "MLP_MULT": "4.0", "SKIP_GATES_ENABLED": "1", "TIE_EMBEDDINGS": "1", "LOGIT_SOFTCAP": "30.0",
    "ROPE_BASE": "10000.0", "ROPE_DIMS": "16", "ROPE_TRAIN_SEQ_LEN": "2048", "LN_SCALE": "1",
    "QK_GAIN_INIT": "4.0", "NUM_LOOPS": "2", "LOOP_START": "4", "LOOP_END": "5", "ENABLE_LOOPING_AT": "0.5",
    "MIN_LR": "0.0", "EMBED_LR": "0.6", "HEAD_LR": "0.008", "TIED_EMBED_LR": "0.03",
    "TIED_EMBED_INIT_STD": "0.005", "MATRIX_LR": "0.02", "SCALAR_LR": "0.02", "MUON_MOMENTUM": "0.99",
    "MUON_BACKEND_STEPS": "5", "MUON_MOMENTUM_WARMUP_START": "0.92", "MUON_MOMENTUM_WARMUP_STEPS": "1500",
    "MUON_ROW_NORMALIZE": "1", "BETA1": "0.9", "BETA2": "0.95", "ADAM_EPS": "1e-8", "GRAD_CLIP_NORM": "0.3",
    "EVAL_STRIDE": "64", "MUON_BETA2": "0.95", "ADAM_WD": "0.02", "MUON_WD": "0.085", "EMBED_WD": "0.085",
    "EMA_DECAY": "0.997", "COMPRESSOR": "brotli", "GPTQ_CALIBRATION_BATCHES": "64",
    "GPTQ_RESERVE_SECONDS": "12.0", "MATRIX_BITS": "6", "EMBED_BITS": "8", "MATRIX_CLIP_SIGMAS": "12.85",
    "EMBED_CLIP_SIGMAS": "20.0", "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0",
}  # fmt: skip


def test_record_environment_at_its_defaults_is_the_record_preset():
    from qlab.config import get_preset

    train, model = resolve_configs("record", env=RECORD_ENV)
    assert model == get_preset("record")
    base, _ = resolve_configs("record", env={})
    changed = {k for k, v in train.to_dict().items() if base.to_dict()[k] != v}
    # Only what the command line really changes: seed, run directory, data folder, eval batch.
    assert changed == {"seed", "out_dir", "data", "val_batch_seqs"}, changed
    assert (train.seed, train.data, train.val_batch_seqs) == (42, "./data/", 32)
    assert train.final_sliding and train.val_max_tokens == 0 and train.val_every == 4000


def test_record_loop_xsa_and_lr_variables_change_the_config():
    env = {"NUM_LOOPS": "1", "LOOP_START": "3", "LOOP_END": "6", "XSA_LAST_N": "4", "MIN_LR": "0.1",
           "SKIP_GATES_ENABLED": "0", "TIE_EMBEDDINGS": "0", "EMBED_LR": "0.5",
           "HEAD_LR": "0.01"}  # fmt: skip
    train, model = resolve_configs("record", env=env)
    assert model.loop_layers == (3, 4, 5, 6) and model.loop_repeats == 2
    assert [model.uses_xsa(i) for i in range(11)] == [False] * 7 + [True] * 4
    assert not model.skip_gates and not model.tie_embeddings
    assert (train.min_lr, train.untied_embed_lr, train.head_lr) == (0.1, 0.5, 0.01)
    _, off = resolve_configs("record", env={"NUM_LOOPS": "0", "XSA_LAST_N": "0"})
    assert off.loop_layers is None and not off.xsa


@pytest.mark.parametrize(
    "env, match",
    [
        ({"EMBEDDING_DIM": "256"}, "EMBEDDING_DIM"),
        ({"MATRIX_BITS": "six"}, "MATRIX_BITS"),
        ({"EMBED_BITS": "12"}, "EMBED_BITS"),
        ({"COMPRESSOR": "zip"}, "COMPRESSOR"),
        ({"GPTQ_CALIBRATION_BATCHES": "-1"}, "GPTQ_CALIBRATION_BATCHES"),
        ({"MATRIX_CLIP_SIGMAS": "nan"}, "MATRIX_CLIP_SIGMAS"),
        ({"MUON_BETA2": "x"}, "MUON_BETA2"),
        ({"XSA_LAST_N": "-1"}, "XSA_LAST_N"),
        ({"LOOP_START": "6", "LOOP_END": "5"}, "LOOP_START"),
        ({"VAL_BATCH_TOKENS": "100"}, "VAL_BATCH_TOKENS"),
    ],
)
def test_bad_record_variables_are_named(env, match):
    with pytest.raises(ConfigError, match=match):
        resolve_configs("record", env=env)


def test_a_record_command_line_trains_with_qlab_train(tiny_dataset, tmp_path, monkeypatch):
    """The record's variables, sized down for a CPU, drive `qlab train --preset record`."""
    import json

    from qlab.cli import main

    small = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "EMBEDDING_DIM": "32", "NUM_HEADS": "2",
             "NUM_KV_HEADS": "1", "ROPE_DIMS": "8", "XSA_LAST_N": "1", "LOOP_START": "1", "LOOP_END": "1",
             "NUM_LOOPS": "1", "VOCAB_SIZE": str(tiny_dataset.vocab_size), "TRAIN_SEQ_LEN": "32",
             "EVAL_SEQ_LEN": "32", "ROPE_TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "256",
             "VAL_BATCH_TOKENS": "2048", "ITERATIONS": "4", "WARMUP_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0",
             "TRAIN_LOG_EVERY": "1", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "16", "WORLD_SIZE": "1",
             "DATA_PATH": str(tiny_dataset.root), "RUN_ID": "smoke"}  # fmt: skip
    for k, v in {**RECORD_ENV, **small}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VAL_MAX_TOKENS", "4097")  # qlab's own name: keep the CPU smoke short
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "record", "--device", "cpu"]) == 0
    run = tmp_path / "runs" / "smoke"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["seed"] == 42 and cfg["train"]["final_sliding"] is True
    assert cfg["model"]["xsa_last_n"] == 1 and cfg["model"]["loop_layers"] == [1]
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["step"] == 4
    assert math.isfinite(final["val_bpb"]) and math.isfinite(final["val_bpb_sliding"])

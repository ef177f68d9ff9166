"""ModelConfig: presets, JSON round trip, validation errors."""

from __future__ import annotations

import json

import pytest

from qlab.config import PRESETS, ModelConfig, get_preset
from qlab.errors import ConfigError


def test_presets_exist_and_are_copies():
    assert set(PRESETS) == {"baseline", "record", "tiny"}
    cfg = get_preset("record")
    cfg.num_layers = 3
    assert get_preset("record").num_layers == 11


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError) as err:
        get_preset("huge")
    for name in ("baseline", "record", "tiny", "huge"):
        assert name in str(err.value)


def test_preset_values_match_papers():
    base, rec = get_preset("baseline"), get_preset("record")
    assert (base.num_layers, base.model_dim, base.num_heads, base.num_kv_heads) == (9, 512, 8, 4)
    assert (base.vocab_size, base.mlp_hidden, base.activation, base.q_gain_init) == (1024, 1024, "relu2", 1.5)
    assert base.loop_layers is None and not base.skip_gates and not base.xsa and base.rope_dim == 64
    assert (rec.num_layers, rec.vocab_size, rec.mlp_hidden, rec.activation) == (11, 8192, 2048, "leaky_relu2")
    assert (rec.rope_dim, rec.q_gain_init, rec.loop_layers, rec.loop_repeats) == (16, 4.0, (4, 5), 3)
    assert rec.loop_start_frac == 0.5 and rec.logit_softcap == 30.0 and rec.ln_scale and rec.xsa


def test_tiny_uses_record_features():
    t = get_preset("tiny")
    assert (t.vocab_size, t.model_dim, t.num_heads, t.num_kv_heads, t.train_seq_len) == (1024, 128, 4, 2, 256)
    assert 4 <= t.num_layers <= 6 and 3 <= t.mlp_mult <= 4
    assert t.activation == "leaky_relu2" and t.rope_dim < t.head_dim and t.xsa and t.skip_gates
    assert t.q_gain_init == 4.0 and t.ln_scale and t.logit_softcap == 30.0 and len(t.loop_layers) == 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_json(name):
    cfg = get_preset(name).replace(value_embed_layers=(0, 1), attn_window=64, bigram_buckets=4096)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.value_embed_layers, tuple)


def test_from_dict_names_unknown_keys():
    d = get_preset("tiny").to_dict()
    d["n_layer"] = 3
    d["dropout"] = 0.1
    with pytest.raises(ConfigError, match="dropout, n_layer"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError):
        ModelConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match="bogus"):
        get_preset("tiny").replace(bogus=1)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model_dim": 130}, "num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"rope_dims": 7}, "rope_dims"),
        ({"rope_dims": 40}, "rope_dims"),
        ({"rope_dims": 0}, "rope_dims"),
        ({"loop_layers": (3, 4)}, "loop_layers"),
        ({"loop_layers": (1, 3)}, "contiguous"),
        ({"loop_layers": ()}, "loop_layers"),
        ({"loop_repeats": 0}, "loop_repeats"),
        ({"loop_start_frac": 1.5}, "loop_start_frac"),
        ({"activation": "gelu"}, "activation"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_layers": True}, "num_layers"),
        ({"mlp_mult": float("nan")}, "mlp_mult"),
        ({"logit_softcap": 0.0}, "logit_softcap"),
        ({"embed_init_std": float("inf")}, "embed_init_std"),
        ({"attn_window": 0}, "attn_window"),
        ({"bigram_buckets": -1}, "bigram_buckets"),
        ({"bigram_buckets": 1}, "bigram_buckets"),
        ({"value_embed_layers": (9,)}, "value_embed_layers"),
        ({"value_embed_layers": (1, 1)}, "value_embed_layers"),
        ({"train_seq_len": 0}, "train_seq_len"),
        ({"xsa": "yes"}, "xsa"),
        ({"value_embed_layers": 3}, "value_embed_layers"),
        ({"loop_layers": 4}, "loop_layers"),
        ({"leaky_slope": float("nan")}, "leaky_slope"),
    ],
)
def test_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("tiny").replace(**changes)


def test_lists_become_tuples():
    cfg = ModelConfig(loop_layers=[4, 5], value_embed_layers=[1])
    assert cfg.loop_layers == (4, 5) and cfg.value_embed_layers == (1,)

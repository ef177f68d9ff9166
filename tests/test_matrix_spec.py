"""Matrix grid specs: variant parsing, TOML/YAML loading, cell ids, sharding, bad input."""

from __future__ import annotations

import math

import pytest
import yaml

from qlab.analysis.hidden_quant import HIDDEN_SCHEMES
from qlab.analysis.matrix import (
    load_spec,
    parse_shard,
    parse_variant,
    plan_cells,
    shard_cells,
    spec_from_dict,
    with_overrides,
)
from qlab.errors import ConfigError

SPEC = {
    "name": "t",
    "seeds": [0, 1],
    "variants": ["ES=0.05", "qahsp=0.3", "QAHSP=0.15+ES=0.03"],
    "bases": {
        "A": {
            "preset": "tiny",
            "model": {"model_dim": 32, "num_layers": 2, "loop_layers": [1]},
            "train": {"iterations": 5},
        },
        "B": {"preset": "tiny", "model": {"model_dim": 48, "num_layers": 2, "loop_layers": [1]}},
    },
    "quant": {
        "weight_policies": ["rtn_int6", "mine"],
        "policies": {"mine": {"rules": [{"pattern": "*", "ndim": 2, "spec": {"method": "rtn", "bits": 4}}]}},
    },
}

TOML = """
name = "t"
seeds = [0, 1]
variants = ["ES=0.05", "qahsp=0.3", "QAHSP=0.15+ES=0.03"]
[bases.A]
preset = "tiny"
model = { model_dim = 32, num_layers = 2, loop_layers = [1] }
train = { iterations = 5 }
[bases.B]
preset = "tiny"
model = { model_dim = 48, num_layers = 2, loop_layers = [1] }
[quant]
weight_policies = ["rtn_int6", "mine"]
[quant.policies.mine]
rules = [{ pattern = "*", ndim = 2, spec = { method = "rtn", bits = 4 } }]
"""


def test_parse_variant_canonical_names_and_paper_columns():
    v = parse_variant("qahsp=0.15+ES=0.03")
    assert v.label == "QAHSP=0.15+ES=0.03" and v.reg_names == "QAHSP+ES"
    assert v.lambdas == "QAHSP=0.15,ES=0.03" and math.isnan(v.lam) and v.slug == "QAHSP0.15+ES0.03"
    s = parse_variant("ES=0.05")
    assert s.lam == 0.05 and s.regs == (("ES", 0.05),) and not s.is_control
    for text in ("no-reg", "", "none", "Control"):
        assert parse_variant(text).is_control and parse_variant(text).label == "no-reg"


@pytest.mark.parametrize("bad", ["ES=0.05+es=0.1", "ES=0", "NOPE=1", "ES", "ES=abc", "ES=nan", 3])
def test_parse_variant_rejects(bad):
    with pytest.raises(ConfigError):
        parse_variant(bad)


def test_toml_and_yaml_give_the_same_cells(tmp_path):
    (tmp_path / "s.toml").write_text(TOML)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SPEC))
    a, b = load_spec(tmp_path / "s.toml"), load_spec(tmp_path / "s.yaml")
    ids = [c.cell_id for c in plan_cells(a)]
    assert ids == [c.cell_id for c in plan_cells(b)] == [c.cell_id for c in plan_cells(spec_from_dict(SPEC))]
    assert len(ids) == 2 * 4 * 2 and ids == sorted(ids)  # control added: 2 bases × 4 variants × 2 seeds
    assert a.variants[0].label == "no-reg" and a.eval.hidden_schemes == tuple(HIDDEN_SCHEMES)
    assert a.eval.hidden_tokens == 128 and a.eval.weight_policies == ("rtn_int6", "mine")
    assert any(i.startswith("A-QAHSP0.15+ES0.03-s1-") for i in ids)


def test_cell_ids_follow_training_identity_only():
    base = [c.cell_id for c in plan_cells(spec_from_dict(SPEC))]
    moved = with_overrides(spec_from_dict(SPEC), data="/elsewhere", device="cpu")
    assert [c.cell_id for c in plan_cells(moved)] == base  # data path and device do not change ids
    longer = {**SPEC, "bases": {**SPEC["bases"], "A": {**SPEC["bases"]["A"], "train": {"iterations": 6}}}}
    changed = [c.cell_id for c in plan_cells(spec_from_dict(longer))]
    assert [i for i in changed if i.startswith("B-")] == [i for i in base if i.startswith("B-")]
    assert not set(i for i in changed if i.startswith("A-")) & set(base)
    # evaluation settings change the eval key, not the cells
    other = spec_from_dict({**SPEC, "eval": {"sliding_stride": 16}})
    assert [c.cell_id for c in plan_cells(other)] == base
    assert other.eval.key() != spec_from_dict(SPEC).eval.key()


def test_base_regularizers_are_part_of_the_base():
    spec = {**SPEC, "bases": {"A": {**SPEC["bases"]["A"], "train": {"regs": {"simctg": 0.3}}}}}
    from qlab.analysis.matrix.spec import resolve_base

    s = spec_from_dict({**spec, "variants": ["ES=0.05"]})
    cells = plan_cells(s)
    regs = {c.variant.label: resolve_base(s, s.base("A"), c.variant, 0)[0].regs for c in cells}
    assert regs == {"no-reg": {"SimCTG": 0.3}, "ES=0.05": {"SimCTG": 0.3, "ES": 0.05}}
    with pytest.raises(ConfigError, match="repeats"):
        spec_from_dict({**spec, "variants": ["SimCTG=0.1"]})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bogus": 1}, "unknown key"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [1, 1]}, "repeat"),
        ({"seeds": [1.5]}, "seeds"),
        ({"variants": ["ES=0.05", "QAHSP=0.15+ES=0.03", "ES=0.03+QAHSP=0.15"]}, "same model"),
        ({"bases": {}}, "at least one base"),
        ({"bases": {"a/b": {}}}, "base names"),
        ({"bases": {"A": {"train": {"seed": 3}}}}, "seeds"),
        ({"bases": {"A": {"flavour": 1}}}, "unknown key"),
        ({"bases": {"A": {"train": {"iterations": -1}}}}, "iterations"),
        ({"bases": {"A": {"model": {"model_dimension": 3}}}}, "model_dimension"),
        ({"quant": {"weight_policies": ["nope"]}}, "nope"),
        ({"quant": {"hidden_schemes": ["int3"]}}, "hidden_schemes"),
        ({"quant": {"hidden_tokens": 1}}, "hidden_tokens"),
        ({"eval": {"sliding_stride": 0}}, "sliding_stride"),
        ({"eval": {"ttt": {"lr": -1}}}, "lr"),
        ({"eval": {"ttt": {"seq_len": 64}}}, "follow the base"),
        ({"eval": {"ttt": {"nonsense": 1}}}, "unknown field"),
    ],
)
def test_bad_specs_raise_config_error(change, match):
    with pytest.raises(ConfigError, match=match):
        spec_from_dict({**SPEC, **change})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match=".toml, .yaml"):
        load_spec(tmp_path / "s.json")
    (tmp_path / "bad.toml").write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(tmp_path / "list.yaml")


def test_shards_partition_the_cells_deterministically():
    cells = plan_cells(spec_from_dict(SPEC))
    for n in (1, 3, 5, 16, 20):
        parts = [shard_cells(cells, i, n) for i in range(n)]
        ids = [c.cell_id for p in parts for c in p]
        assert sorted(ids) == sorted(c.cell_id for c in cells) and len(set(ids)) == len(ids)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert shard_cells(list(reversed(cells)), 0, n) == parts[0]  # independent of input order
    assert [c.cell_id for c in shard_cells(cells, 1, 3)] == [c.cell_id for c in cells[1::3]]


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1/0", "x", "1/2/3", "-1/2"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    with pytest.raises(ConfigError):
        shard_cells([], 2, 2)


def test_example_specs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "qlab" / "resources" / "matrix"
    smoke = load_spec(root / "smoke.toml")
    assert len(smoke.bases) == 2 and len(smoke.variants) == 4 and len(plan_cells(smoke)) == 16
    full = load_spec(root / "full_8xh100.toml")
    assert len(plan_cells(full)) == 2 * 12 * 3 and full.eval.ttt["chunk_tokens"] == 32768

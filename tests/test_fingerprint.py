"""``qlab fingerprint``: weight and activation fingerprints, writing tables, the CLI."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from qlab.analysis.fingerprint import (
    activation_fingerprint,
    fingerprint,
    last_block,
    sensitivity_quantizer,
    weight_fingerprint,
    write_fingerprint,
)
from qlab.analysis.spectra import FAMILIES
from qlab.cli import main
from qlab.config import get_preset
from qlab.data.tokenizer import build_byte_tables, load_tokenizer, token_bytes
from qlab.errors import CheckpointError, ConfigError, DataError
from qlab.io import checkpoint as ckpt
from qlab.model.gpt import GPT
from qlab.quant.policy import dequantize_state_dict, policy_from_dict, quantize_state_dict
from qlab.train.config import TrainConfig

QLAB_FAMILIES = [f for f in FAMILIES if f not in ("qkv", "mlp_gate")]  # a qlab GPT: no fused QKV, no gate

MC = get_preset("tiny").replace(
    vocab_size=512, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, rope_dims=8, loop_layers=None,
    train_seq_len=32, eval_seq_len=32,
)  # fmt: skip
# Every 2-D matrix by RTN int4 per row, so a small model is visibly quantized.
INT4 = policy_from_dict(
    {
        "name": "int4_all",
        "rules": [{"pattern": "*", "ndim": 2, "spec": {"method": "rtn", "bits": 4, "clip": "absmax"}}],
    }
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: extra threads only add contention on a busy 2-core machine. Module
    # scope, so the module-scoped fixtures below run single-threaded too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> GPT:
    """A GPT whose zero-initialised projections got small random weights (as after training)."""
    torch.manual_seed(seed)
    model = GPT(MC)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(0.0, 0.05)
    return model


def _save_run(path, model: GPT):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return ckpt.save_checkpoint(
        path, model, None, opt, {"step": 0, "tokens_seen": 0}, MC, TrainConfig(train_seq_len=32)
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("fp_run"), _model())


@pytest.fixture(scope="module")
def st_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp_st") / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in _model(1).state_dict().items()}, str(path))
    return path


def _batch(n_seq: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MC.vocab_size, (n_seq, MC.eval_seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# --------------------------------------------------------------------------- weights
def test_weight_fingerprint_on_bare_safetensors(st_file):
    out = weight_fingerprint(st_file)
    assert set(out) == {"spectral_summary", "family_spectra", "family_summary"}
    sd = _model(1).state_dict()
    mats = {n: t for n, t in sd.items() if t.ndim == 2 and min(t.shape) >= 2}
    summary = out["spectral_summary"]
    assert len(summary) == len(mats) and set(summary["variant"]) == {"model"}
    # σ_max against the spectral norm computed independently
    for name in ("blocks.1.mlp.fc.weight", "tok_emb.weight"):
        row = summary.set_index("name").loc[name]
        assert row["sigma_max"] == pytest.approx(
            float(torch.linalg.matrix_norm(mats[name].double(), 2)), rel=1e-9
        )
    fams = out["family_summary"]
    assert list(fams["family"]) == QLAB_FAMILIES
    assert (fams["n_matrices"] == [2, 2, 2, 2, 2, 2, 1]).all()
    # family spectra start at σ₁/σ₁ = 1 and decrease
    for _, g in out["family_spectra"].groupby("family"):
        assert g["sigma_norm"].iloc[0] == pytest.approx(1.0)
        assert (g["sigma_norm"].diff().dropna() <= 1e-12).all()


def test_differential_against_itself_is_zero(st_file):
    out = weight_fingerprint(st_file, against=st_file, against_label="same")
    diff = out["spectral_differential"]
    assert set(diff["variant"]) == {"model"} and set(diff["reference"]) == {"same"}
    assert set(diff["family"]) == set(QLAB_FAMILIES)
    assert (diff["delta_pct"] == 0).all()
    assert set(out["family_summary"]["variant"]) == {"model", "same"}


def test_before_vs_after_quantization_matches_direct_svd():
    sd = {k: v.detach() for k, v in _model(2).state_dict().items()}
    out = weight_fingerprint(sd, policy=INT4)
    qlabel = "model quantized (int4_all)"
    assert set(out["spectral_summary"]["variant"]) == {"model", qlabel}
    deq = dequantize_state_dict(quantize_state_dict(sd, INT4), torch.float32)
    name = "blocks.0.attn.c_v.weight"
    row = out["spectral_summary"].set_index(["variant", "name"]).loc[(qlabel, name)]
    assert row["sigma_max"] == pytest.approx(float(torch.linalg.matrix_norm(deq[name].double(), 2)), rel=1e-9)
    diff = out["spectral_differential"]
    assert set(diff["variant"]) == {qlabel} and set(diff["reference"]) == {"model"}
    assert diff["delta_pct"].abs().max() > 0.1  # int4 visibly moves the spectrum


def test_weight_fingerprint_rejects_bad_arguments(st_file):
    sd = _model().state_dict()
    with pytest.raises(ConfigError, match="not both"):
        weight_fingerprint(sd, policy="record", quantized=sd)
    with pytest.raises(ConfigError, match="distinct"):
        weight_fingerprint(sd, against=sd, against_label="model")
    with pytest.raises(ConfigError, match="unknown quantization policy"):
        weight_fingerprint(sd, policy="int3_magic")
    with pytest.raises(DataError, match="NaN"):
        weight_fingerprint({"w": torch.full((4, 4), float("nan"))})
    with pytest.raises(CheckpointError):
        weight_fingerprint(st_file.parent / "missing.safetensors")


# --------------------------------------------------------------------------- activations
def test_activation_fingerprint_tables_and_independent_checks():
    model = _model()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    idx, targets = _batch()
    out = activation_fingerprint(
        model,
        idx,
        targets,
        quantized_model=copy.deepcopy(model),
        against_model=other,
        sensitivity=sensitivity_quantizer(),
    )
    n, d = idx.numel(), MC.model_dim
    variants = {"model", "reference", "quantized"}
    assert set(out["depth"]["variant"]) == variants
    # logit lens of the last block is the model's own loss
    last = out["depth"][out["depth"]["variant"] == "model"].iloc[-1]
    with torch.no_grad():
        loss = float(model(idx, targets))
    assert last["lens_loss"] == pytest.approx(loss, rel=1e-5)
    assert last["lens_bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-5)
    # histograms count every value / token of the last block's output
    for _, g in out["coord_hist"].groupby("variant"):
        assert g["count"].sum() == n * d and set(g["layer"]) == {"block_1"}
    assert (out["norm_hist"].groupby("variant")["count"].sum() == n).all()
    assert (out["pca3"].groupby("variant").size() == n).all()
    assert out["pca3"]["position"].max() == MC.eval_seq_len - 1
    hq = out["hidden_quant"]
    assert len(hq) == 7 * 3 and set(hq["n_tokens"]) == {128}
    # CKA: 1 on the diagonal; an identical copy gives 1 everywhere on the diagonal across
    cl = out["cka_layers"]
    assert cl.loc[cl["layer_a"] == cl["layer_b"], "cka"].sub(1).abs().max() < 1e-9
    ca = out["cka_across"]
    same = ca[(ca["variant_b"] == "quantized") & (ca["layer_a"] == ca["layer_b"])]
    assert len(same) == MC.num_layers + 1 and same["cka"].sub(1).abs().max() < 1e-9
    cv = out["cka_variants"].set_index(["variant_a", "variant_b"])["cka"]
    assert cv[("model", "quantized")] == pytest.approx(1.0) and cv[("model", "reference")] < 1.0
    hm = out["hidden_metrics"]
    assert list(hm[hm["variant"] == "model"]["layer"]) == ["block_0", "block_1", "final"]
    sens = out["sensitivity"]
    assert list(sens["group"]) == ["block_0", "block_1"] and (sens["delta_loss"] != 0).all()


def test_activation_fingerprint_bits_per_byte(tiny_dataset):
    model = _model()
    idx, targets = _batch(2)
    tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path), MC.vocab_size)
    out = activation_fingerprint(model, idx, targets, byte_tables=tables)
    total = float(token_bytes(tables, idx, targets).double().sum())
    last = out["depth"].iloc[-1]
    assert last["lens_bpb"] == pytest.approx(last["lens_loss"] * idx.numel() / math.log(2) / total, rel=1e-9)
    assert "cka_across" not in out and "sensitivity" not in out


def test_last_block_picks_highest_position():
    acts = {"block_0": 0, "block_10": 1, "block_2": 2, "final": 3}
    assert last_block(acts) == "block_10"
    with pytest.raises(DataError):
        last_block({"final": 0})


# --------------------------------------------------------------------------- whole checkpoint
def test_fingerprint_run_dir_with_gptq_quantized_copy(run_dir, tiny_dataset):
    gptq = policy_from_dict(
        {
            "name": "gptq6",
            "rules": [{"pattern": "blocks.*", "ndim": 2, "spec": {"method": "gptq", "bits": 6}}],
        }
    )
    out = fingerprint(run_dir, data=tiny_dataset, policy=gptq, n_tokens=64, calib_batches=1, sensitivity=True)
    meta = dict(zip(out["meta"]["key"], out["meta"]["value"]))
    assert meta["activations"] == "True" and meta["n_tokens"] == "64" and meta["seq_len"] == "32"
    assert meta["quantizer"].startswith("gptq6: 12 GPTQ tensors")
    for name in (
        "depth",
        "hidden_metrics",
        "pca3",
        "cka_layers",
        "cka_across",
        "hidden_quant",
        "sensitivity",
    ):
        assert name in out, name
    label = run_dir.name
    assert set(out["depth"]["variant"]) == {label, f"{label} quantized (gptq6)"}
    assert "lens_bpb" in out["depth"].columns


def test_fingerprint_weights_only_paths(st_file, run_dir):
    out = fingerprint(st_file, against=st_file, data="embedded", policy=None)
    meta = dict(zip(out["meta"]["key"], out["meta"]["value"]))
    assert meta["activations"] == "False" and meta["format"] == "safetensors"
    assert set(out["spectral_differential"]["reference"]) == {"weights.safetensors (reference)"}
    assert "depth" not in out
    out = fingerprint(run_dir, data=None, policy="record")  # run dir without data: weights only
    assert "depth" not in out and len(set(out["family_summary"]["variant"])) == 2
    with pytest.raises(ConfigError):
        fingerprint(run_dir, n_tokens=2)


def test_write_fingerprint(tmp_path):
    df = pd.DataFrame({"variant": ["a", "b"], "x": [1.5, float("nan")]})
    paths = write_fingerprint({"t1": df, "t2": df.head(1)}, tmp_path / "out")
    assert [p.name for p in paths] == ["t1.csv", "t1.json", "t2.csv", "t2.json"]
    back = pd.read_csv(tmp_path / "out" / "t1.csv")
    pd.testing.assert_frame_equal(back, df)
    assert json.loads((tmp_path / "out" / "t1.json").read_text()) == [
        {"variant": "a", "x": 1.5},
        {"variant": "b", "x": None},
    ]
    assert [p.name for p in write_fingerprint({"t": df}, tmp_path / "o2", formats=("json",))] == ["t.json"]
    with pytest.raises(ConfigError):
        write_fingerprint({"t": df}, tmp_path, formats=("xlsx",))
    with pytest.raises(ConfigError):
        write_fingerprint({"../evil": df}, tmp_path)
    with pytest.raises(DataError):
        write_fingerprint({"t": [1, 2]}, tmp_path)


# --------------------------------------------------------------------------- CLI
def test_cli_run_dir(run_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "fp"
    args = [
        "fingerprint",
        str(run_dir),
        "--data",
        str(tiny_dataset.root),
        "--tokens",
        "64",
        "--calib-batches",
        "0",
    ]
    assert main([*args, "--policy", "none", "--out", str(out), "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "mean tail flatness per family" in text and "last block" in text and "cka_layers" in text
    written = {p.name for p in out.iterdir()}
    assert {"depth.csv", "depth.json", "family_summary.csv", "hidden_quant.json", "meta.csv"} <= written
    assert not any(name.endswith(".png") for name in written)


def test_cli_safetensors_with_figures(st_file, tmp_path, capsys):
    out = tmp_path / "fp"
    assert main(["fingerprint", str(st_file), "--policy", "none", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "activations: skipped" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["pr2011_spectral_layers.png", "pr2011_svd_flatness.png", "pr2011_svd_spectrum.png"]
    assert all(p.stat().st_size < 300_000 for p in out.glob("*.png"))


def test_cli_errors(tmp_path, capsys):
    assert main(["fingerprint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["fingerprint", str(tmp_path), "--tokens", "3"]) == 2


def test_fingerprint_of_a_checkpoint_without_qlab_names(tmp_path):
    """Names no naming scheme knows: per-matrix spectra, no family tables or figures."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {f"net.stage{i}.mixer.kernel": torch.randn(64, 64, generator=g) for i in range(3)}
    sd["net.lookup.table"] = torch.randn(300, 64, generator=g)
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert main(["fingerprint", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "fp")]) == 0
    summary = pd.read_csv(tmp_path / "fp" / "spectral_summary.csv")
    assert summary["name"].nunique() == 4 and summary["sigma_max"].gt(0).all()
    assert not list((tmp_path / "fp").glob("*.png"))  # every figure needs qlab's layer/family names

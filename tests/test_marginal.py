"""The marginal table: per-token scores, document sums, paired bootstrap, resume, CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from qlab.analysis import allocator as A
from qlab.analysis import marginal as M
from qlab.cli import main
from qlab.data import build_byte_tables, load_tokenizer, load_validation_tokens
from qlab.errors import ConfigError
from qlab.eval.agreement import document_sums
from qlab.eval.bpb import evaluate_bpb, token_scores
from qlab.quant.policy import TensorSpec
from tests.test_cli_quantize import POLICY, run_dir  # noqa: F401  (the module fixture)


def test_paired_delta_by_hand():
    base = np.array([10.0, 20.0, 30.0])
    nll = np.array([11.0, 20.0, 33.0])
    doc_bytes = np.array([5.0, 10.0, 15.0])
    delta, lo, hi = M.paired_delta(base, nll, doc_bytes, n_boot=0)
    assert delta == pytest.approx(4.0 / math.log(2) / 30.0) and math.isnan(lo) and math.isnan(hi)
    delta, lo, hi = M.paired_delta(base, nll, doc_bytes, n_boot=2000)
    assert lo <= delta <= hi and lo >= 0  # every document got worse or stayed: the interval is ≥ 0
    assert M.paired_delta(base, base.copy(), doc_bytes, n_boot=200) == (0.0, 0.0, 0.0)


def test_document_sums_cut_at_bos():
    tokens = torch.tensor([1, 5, 6, 1, 7, 8, 9, 1, 4])  # documents start at BOS = 1
    nll = torch.arange(1, 9, dtype=torch.float64)  # targets at positions 1..8
    nbytes = torch.ones(8, dtype=torch.float64)
    doc_nll, doc_bytes = document_sums(torch.arange(1, 9), tokens, 1, nll, nbytes)
    # position 3 (a BOS target) opens document 2, as does position 7
    assert doc_nll.tolist() == [1 + 2, 3 + 4 + 5 + 6, 7 + 8] and doc_bytes.tolist() == [2, 4, 2]


def test_predictor_fit_by_hand():
    groups = ["attention", "mlp", "attention", "mlp"]
    table = pd.DataFrame(
        {"group": groups, "delta_hessian_err": [1.0, 2.0, 3.0, 4.0], "delta_bpb": [0.5, 1.0, 1.5, 2.0]}
    )
    fit = M.fit_predictor(table)
    assert fit["slopes"] == {"matrices": pytest.approx(0.5)} and fit["r2"] == pytest.approx(1.0)
    assert fit["loo_r2"] == pytest.approx(1.0) and fit["n"] == 4
    noisy = table.assign(delta_bpb=[0.5, 2.0, 1.0, 2.0])
    assert M.fit_predictor(noisy)["loo_r2"] < M.fit_predictor(noisy)["r2"] < 1
    assert math.isnan(fit["r2_ceiling"])  # no intervals, no ceiling
    # se = half-width / 1.96 = 0.25 on every row; var(Δbpb) = 0.3125: ceiling 1 − 0.0625 / 0.3125
    with_ci = table.assign(ci_lo=table["delta_bpb"] - 0.49, ci_hi=table["delta_bpb"] + 0.49)
    assert M.fit_predictor(with_ci)["r2_ceiling"] == pytest.approx(1 - 0.25**2 / 0.3125, rel=1e-4)


def test_predictor_slopes_by_hessian_kind_match_least_squares_by_hand():
    # the embedding's rows lie on 3x + 1, the matrices' on 0.5x + 1: two slopes fit exactly
    table = pd.DataFrame({"group": ["embedding", "embedding", "mlp", "attention", "mlp"],
                          "delta_hessian_err": [1.0, 2.0, 1.0, 2.0, 4.0],
                          "delta_bpb": [4.0, 7.0, 1.5, 2.0, 3.0]})  # fmt: skip
    fit = M.fit_predictor(table)
    assert fit["slopes"] == {"embedding": pytest.approx(3.0), "matrices": pytest.approx(0.5)}
    assert fit["intercept"] == pytest.approx(1.0) and fit["r2"] == pytest.approx(1.0)
    np.testing.assert_allclose(fit["predicted"], table["delta_bpb"])
    shared = M.fit_predictor(table, slopes="shared")
    x, y = table["delta_hessian_err"], table["delta_bpb"]
    assert shared["slopes"]["all"] == pytest.approx(np.polyfit(x, y, 1)[0]) and shared["r2"] < 1
    assert set(M.fit_predictor(table, slopes="group")["slopes"]) == {"embedding", "mlp", "attention"}
    with pytest.raises(ConfigError, match="slopes"):
        M.fit_predictor(table, slopes="layer")


def test_settings_change_the_spec():
    spec = TensorSpec(bits=6, clip_params={"k": 12.0})
    assert M.changed_spec(spec, "bits+1").bits == 7 and M.changed_spec(spec, "bits-3").bits == 3
    assert M.changed_spec(TensorSpec(bits=8), "bits+1").bits == 8  # kept in 2..8
    assert M.changed_spec(spec, "k*1.25").clip_params["k"] == pytest.approx(15.0)
    with pytest.raises(ConfigError, match="unknown setting"):
        M.changed_spec(spec, "bits*2")
    with pytest.raises(ConfigError, match="needs a clip rule with a k"):
        M.changed_spec(TensorSpec(clip="absmax"), "k*2")


@pytest.fixture(scope="module")
def setup(run_dir, tiny_dataset):  # noqa: F811
    from qlab.eval.context import resolve_model
    from qlab.quant.model_quant import calibration_batches, model_hessians
    from qlab.quant.policy import policy_from_dict

    model, _ = resolve_model(run_dir)
    policy = policy_from_dict(POLICY)
    batches = calibration_batches(tiny_dataset, 2, seq_len=model.config.train_seq_len, batch_seqs=2)
    hessians = model_hessians(model, policy, batches)
    val = load_validation_tokens(tiny_dataset.val_files, model.config.eval_seq_len)
    tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path), model.config.vocab_size)
    return model, policy, hessians, val[:2049], tables


def test_token_scores_sum_to_evaluate_bpb(setup):
    model, _, _, val, tables = setup
    nll, nbytes, pos = token_scores(model, val, tables, seq_len=32)
    ref = evaluate_bpb(model, val, tables, seq_len=32)
    assert nll.numel() == ref.tokens and int(nbytes.sum()) == ref.bytes
    assert float(nll.sum() / math.log(2) / nbytes.sum()) == pytest.approx(ref.val_bpb, rel=1e-9)
    assert pos.unique().numel() == pos.numel()  # each target scored once


def test_marginal_table_measures_and_resumes(setup, tmp_path, monkeypatch):
    model, policy, hessians, val, tables = setup
    out = tmp_path / "m.csv"
    kw = dict(seq_len=32, settings=["bits-1", "bits+1"], n_boot=200, out=out)
    table = M.marginal_table(model, policy, val, tables, hessians, **kw)
    assert set(table["group"]) == {"embedding", "attention", "mlp"}
    emb = table[table["group"] == "embedding"]
    assert list(emb["setting"]) == ["bits-1"]  # bits+1 on int8 changes nothing: skipped
    fewer = table[table["setting"] == "bits-1"]
    assert (fewer["delta_bytes"] < 0).all() and (table[table["setting"] == "bits+1"]["delta_bytes"] > 0).all()
    assert (fewer["delta_hessian_err"] > 0).all()  # a bit less: more Hessian-weighted error
    assert ((table["ci_lo"] <= table["delta_bpb"]) & (table["delta_bpb"] <= table["ci_hi"])).all()
    assert (table["resolved"] == ((table["ci_lo"] > 0) | (table["ci_hi"] < 0))).all()
    pd.testing.assert_frame_equal(pd.read_csv(out), table, check_dtype=False)
    calls = []
    real = M.measure_policy
    monkeypatch.setattr(M, "measure_policy", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = M.marginal_table(model, policy, val, tables, hessians, **kw)
    assert len(calls) == 1  # the base only: every row came from the file
    pd.testing.assert_frame_equal(again, table, check_dtype=False)


def test_a_table_without_evaluation_is_completed_by_the_predictor(setup, monkeypatch):
    model, policy, hessians, val, tables = setup
    kw = dict(seq_len=32, settings=["bits-1", "bits+1", "k*1.25"], n_boot=100)
    measured = M.marginal_table(model, policy, val, tables, hessians, **kw)
    scored = []
    real = M.token_agreement  # every forward pass of the table goes through it
    monkeypatch.setattr(M, "token_agreement", lambda *a, **k: scored.append(1) or real(*a, **k))
    blind = M.marginal_table(model, policy, val, tables, hessians, evaluate=False, **kw)
    assert scored == []  # not one forward pass
    cols = ["group", "setting", "delta_bytes", "delta_hessian_err"]
    pd.testing.assert_frame_equal(blind[cols], measured[cols])  # the same quantization and bytes
    assert blind["delta_bpb"].isna().all() and not blind["resolved"].any()
    # fit on two thirds of the measured rows, predict every row of the blind table
    fit = M.fit_predictor(measured.iloc[: 2 * len(measured) // 3], slopes="shared")
    pred = M.predict_delta_bpb(blind, fit)
    x = blind["delta_hessian_err"].to_numpy()
    np.testing.assert_allclose(pred, fit["intercept"] + fit["slopes"]["all"] * x)
    np.testing.assert_allclose(
        M.predict_delta_bpb(measured.iloc[: 2 * len(measured) // 3], fit), fit["predicted"]
    )
    # the allocator takes the predicted column; without one it refuses the NaN table
    picks, bpb, nbytes = A.choose_settings(blind.assign(predicted_bpb=pred), 0, value="predicted_bpb")
    assert nbytes <= 0
    with pytest.raises(ConfigError, match="finite"):
        A.choose_settings(blind, 0)
    # fit_predictor ignores rows that were not measured
    both = pd.concat([measured, blind.assign(group="mlp")], ignore_index=True)
    assert M.fit_predictor(both)["n"] == len(measured)


def test_marginal_cli(run_dir, tiny_dataset, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "marg"
    policy = str(run_dir / "policy.json")
    args = ["marginal", str(run_dir), "--data", str(tiny_dataset.root), "--policy", policy,
            "--settings", "bits-1", "--calib-batches", "1", "--boot", "100", "--eval-tokens", "1025",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "base:" in text and "bits-1" in text and (out / "marginal.png").is_file()
    assert len(pd.read_csv(out / "marginal.csv")) == 3
    assert main([*args[:-3], "--settings", "bits*2", "--out", str(out), "--no-progress"]) == 2


def test_choose_settings_by_hand():
    table = pd.DataFrame(
        {
            "group": ["a", "a", "b", "b"],
            "setting": ["up", "down", "up", "down"],
            "delta_bytes": [100, -100, 50, -60],
            "delta_bpb": [-0.003, 0.004, -0.001, 0.0005],
        }
    )
    # budget 0: a up + b down is +40 B (over), so nothing inside it lowers the bpb
    choice, bpb, nbytes = A.choose_settings(table, 0)
    assert choice == {} and bpb == 0.0  # nothing inside the budget lowers the bpb
    choice, bpb, nbytes = A.choose_settings(table, 40)
    assert choice == {"a": "up", "b": "down"} and nbytes == 40 and bpb == pytest.approx(-0.0025)
    choice, _, _ = A.choose_settings(table, 1000)
    assert choice == {"a": "up", "b": "up"}
    choice, bpb, nbytes = A.choose_settings(table, -100)  # must save 100 B: the cheapest way
    assert choice == {"a": "down"} and nbytes == -100 and bpb == pytest.approx(0.004)
    with pytest.raises(ConfigError, match="no combination"):
        A.choose_settings(table, -1000)


def _random_table(rng: np.random.Generator, n_groups: int, convex: bool) -> pd.DataFrame:
    rows = []
    for g in range(n_groups):
        if convex:  # diminishing returns: each byte buys less bpb than the one before
            steps = np.sort(rng.uniform(50, 400, 3))
            nbytes = np.cumsum(steps).astype(int)
            gains = np.cumsum(np.sort(rng.uniform(1e-4, 3e-3, 3))[::-1])
            rows += [(f"g{g}", f"up{i}", int(b), -float(d)) for i, (b, d) in enumerate(zip(nbytes, gains))]
            rows.append((f"g{g}", "down", -int(rng.integers(50, 400)), float(rng.uniform(1e-3, 5e-3))))
        else:
            rows += [
                (f"g{g}", f"s{i}", int(rng.integers(-400, 400)), float(rng.normal(0, 2e-3))) for i in range(4)
            ]
    return pd.DataFrame(rows, columns=["group", "setting", "delta_bytes", "delta_bpb"])


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_allocation_is_feasible_and_matches_exhaustive_on_convex_tables(seed):
    rng = np.random.default_rng(seed)
    for convex in (True, False):
        table = _random_table(rng, 4, convex)
        for budget in (-300, 0, 250, 900):
            try:
                exact = A.choose_settings(table, budget, method="exhaustive")
            except ConfigError:
                with pytest.raises(ConfigError):
                    A.choose_settings(table, budget, method="lagrangian")
                continue
            got = A.choose_settings(table, budget, method="lagrangian")
            assert got[2] <= budget and got[1] >= exact[1] - 1e-15  # feasible, never better than optimal
            if convex:  # a separable convex problem: the hull holds the optimum up to one group's step
                worst = max(abs(d) for d in table["delta_bpb"])
                assert got[1] - exact[1] <= worst


def test_a_layer_by_family_table_is_allocated_without_enumerating_it():
    table = _random_table(np.random.default_rng(0), 27, convex=True)  # 5^27 combinations
    picks, bpb, nbytes = A.choose_settings(table, 0)
    assert nbytes <= 0 and bpb < 0 and 0 < len(picks) <= 27


def test_marginal_cli_allocates_for_a_cap(run_dir, tiny_dataset, tmp_path, capsys):  # noqa: F811
    from qlab.quant.policy import load_policy

    out = tmp_path / "alloc"
    policy = str(run_dir / "policy.json")
    args = ["marginal", str(run_dir), "--data", str(tiny_dataset.root), "--policy", policy,
            "--settings", "bits-1", "--calib-batches", "1", "--boot", "50", "--eval-tokens", "1025",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = pd.read_csv(out / "marginal.csv")
    cap = int(table["base_bytes"].iloc[0] + table["delta_bytes"].max())  # must save the least any row saves
    assert main([*args, "--cap", str(cap)]) == 0  # the table is resumed from the file
    text = capsys.readouterr().out
    assert f"allocation for {cap:,} B:" in text and "measured vs the base policy" in text
    assert "measured vs the uniform policy at equal bytes" in text
    chosen = load_policy(out / "allocated_policy.json")
    assert any(r.spec.bits in (5, 7) for r in chosen.rules)  # one group a bit narrower


def test_token_scores_with_a_stride_match_sliding_evaluate_bpb(setup):
    model, _, _, val, tables = setup
    nll, nbytes, pos = token_scores(model, val, tables, seq_len=32, stride=8)
    ref = evaluate_bpb(model, val, tables, seq_len=32, stride=8)
    assert nll.numel() == ref.tokens and int(nbytes.sum()) == ref.bytes
    assert float(nll.sum() / math.log(2) / nbytes.sum()) == pytest.approx(ref.val_bpb, rel=1e-9)
    assert pos.unique().numel() == pos.numel() == val.numel() - 1  # every target exactly once

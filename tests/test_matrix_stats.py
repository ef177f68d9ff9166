"""Matrix statistics against hand computation: paired t-tests, seed noise, signs, λ budget; plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import stats

from qlab.analysis.matrix import (
    MatrixResults,
    lambda_budget,
    paired_deltas,
    paired_test,
    reg_deltas,
    seed_summary,
    sign_table,
)
from qlab.errors import DataError

CONTROL = {"A": [1.000, 1.010, 0.990, 1.004], "B": [2.000, 2.002, 1.998, 2.001]}
# per-seed offsets (bpb) of each variant from its base's control
OFFSETS = {
    ("A", "ES=0.1"): [-0.0050, -0.0040, -0.0060, -0.0045],  # helps on A, clearly
    ("B", "ES=0.1"): [0.0030, 0.0020, 0.0035, 0.0025],  # hurts on B: a sign change
    ("A", "HSU=0.2"): [0.0010, -0.0010, 0.0005, -0.0002],  # noise
    ("B", "HSU=0.2"): [0.0010, 0.0012, 0.0008, 0.0011],
    ("A", "ES=0.05+HSU=0.1"): [-0.0070, -0.0060, -0.0065, -0.0072],  # pair beats ES alone on A
    ("B", "ES=0.05+HSU=0.1"): [0.0040, 0.0050, 0.0045, 0.0042],
}
META = {
    "no-reg": ("", math.nan, ""),
    "ES=0.1": ("ES", 0.1, "ES=0.1"),
    "HSU=0.2": ("HSU", 0.2, "HSU=0.2"),
    "ES=0.05+HSU=0.1": ("ES+HSU", math.nan, "ES=0.05,HSU=0.1"),
}


def table() -> pd.DataFrame:
    rows = []
    for base, ctrl in CONTROL.items():
        for variant, (regs, lam, lambdas) in META.items():
            off = OFFSETS.get((base, variant), [0.0] * 4)
            for seed, (c, o) in enumerate(zip(ctrl, off)):
                for policy, extra in (("p6", 0.0), ("p4", 0.01)):
                    rows.append(
                        {
                            "source": "qlab",
                            "base": base,
                            "variant": variant,
                            "regs": regs,
                            "lambda": lam,
                            "lambdas": lambdas,
                            "seed": seed,
                            "policy": policy,
                            "final_bpb": c + o + extra,
                            "artifact_bytes": 1000 + seed,
                        }
                    )
    return pd.DataFrame(rows)


def hand_t(d: np.ndarray) -> tuple[float, float]:
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return t, 2 * stats.t.sf(abs(t), len(d) - 1)


def test_paired_deltas_match_hand_computation():
    out = paired_deltas(table(), "final_bpb")
    assert len(out) == 2 * 2 * 3  # bases × policies × non-control variants
    for (base, variant), off in OFFSETS.items():
        d = 1e3 * np.array(off)
        t, p = hand_t(d)
        for policy in ("p6", "p4"):
            r = out[(out.base == base) & (out.variant == variant) & (out.policy == policy)].iloc[0]
            assert r.unit == "mBPB" and r.n_pairs == 4
            assert r.delta_mean == pytest.approx(d.mean(), abs=1e-9)
            assert r.delta_std == pytest.approx(d.std(ddof=1), abs=1e-9)
            assert r.t_stat == pytest.approx(t, rel=1e-6) and r.p_value == pytest.approx(p, rel=1e-6)
            noise = 1e3 * np.std(CONTROL[base], ddof=1)
            assert r.seed_noise == pytest.approx(noise)
            assert r.exceeds_noise == (abs(d.mean()) > noise)
            assert r.significant == (p < 0.05)
    a = out[(out.base == "A") & (out.policy == "p6")].set_index("variant")
    assert a.loc["ES=0.1", "significant"] and not a.loc["HSU=0.2", "significant"]
    assert a.loc["ES=0.1", "regs"] == "ES" and a.loc["ES=0.1", "lambda"] == 0.1


def test_non_bpb_metric_is_not_scaled():
    out = paired_deltas(table(), "artifact_bytes")
    assert set(out.unit) == {"as measured"} and np.allclose(out.delta_mean, 0.0)
    assert set(out.p_value) == {1.0}  # identical zero differences


def test_paired_test_edge_cases():
    assert paired_test([1, 2, 3], [0, 1, 2]) == (math.inf, 0.0)
    assert paired_test([0, 1, 2], [1, 2, 3]) == (-math.inf, 0.0)
    assert paired_test([1, 2], [1, 2]) == (0.0, 1.0)
    t, p = paired_test([1.0], [0.5])
    assert math.isnan(t) and math.isnan(p)
    with pytest.raises(DataError, match="finite"):
        paired_test([1, float("nan")], [1, 2])
    with pytest.raises(DataError):
        paired_test([1, 2, 3], [1, 2])


def test_one_seed_gives_missing_noise_not_invented():
    df = table()
    out = paired_deltas(df[df.seed == 0], "final_bpb")
    assert out.n_pairs.eq(1).all() and out.p_value.isna().all() and out.seed_noise.isna().all()
    assert out.exceeds_noise.isna().all() and out.significant.isna().all()


def test_seed_summary():
    s = seed_summary(table(), "final_bpb").set_index(["base", "variant", "policy"])
    r = s.loc[("A", "no-reg", "p4")]
    assert r["mean"] == pytest.approx(np.mean(CONTROL["A"]) + 0.01) and r["n"] == 4
    assert r["std"] == pytest.approx(np.std(CONTROL["A"], ddof=1))
    assert r["sem"] == pytest.approx(r["std"] / 2)


def test_reg_deltas_in_paper_schema():
    d = reg_deltas(table(), policy="p6").set_index(["base", "variant"])
    assert {"baseline_bpb", "delta_mbpb", "final_bpb", "regs", "lambdas", "lambda"} <= set(d.columns)
    assert d.loc[("A", "ES=0.1"), "delta_mbpb"] == pytest.approx(1e3 * np.mean(OFFSETS[("A", "ES=0.1")]))
    assert d.loc[("B", "no-reg"), "delta_mbpb"] == pytest.approx(0.0)
    with pytest.raises(DataError, match="policy"):
        reg_deltas(table(), policy="p9")
    with pytest.raises(DataError, match="_bpb"):
        reg_deltas(table(), metric="artifact_bytes")


def test_sign_table_flags_sign_changes():
    s = sign_table(table(), policy="p6").set_index("variant")
    assert s.loc["ES=0.1", "sign[A]"] == -1 and s.loc["ES=0.1", "sign[B]"] == 1
    assert s.loc["ES=0.1", "sign_change"] and not s.loc["ES=0.1", "agree"]
    assert s.loc["ES=0.1", "delta[B]"] == pytest.approx(1e3 * np.mean(OFFSETS[("B", "ES=0.1")]))
    assert s.loc["ES=0.05+HSU=0.1", "agree"] == (
        s.loc["ES=0.05+HSU=0.1", "sign[A]"] == s.loc["ES=0.05+HSU=0.1", "sign[B]"]
    )
    assert set(s.index) == {"ES=0.1", "HSU=0.2", "ES=0.05+HSU=0.1"}


def test_lambda_budget_pair_vs_best_single():
    lb = lambda_budget(table(), policy="p6").set_index("base")
    a = lb.loc["A"]
    assert a.pair == "ES=0.05+HSU=0.1" and a.best_single == "ES=0.1" and a.pair_better
    expect = 1e3 * (np.mean(OFFSETS[("A", "ES=0.05+HSU=0.1")]) - np.mean(OFFSETS[("A", "ES=0.1")]))
    assert a.pair_minus_best == pytest.approx(expect)
    pair_minus_single = 1e3 * (
        np.array(OFFSETS[("A", "ES=0.05+HSU=0.1")]) - np.array(OFFSETS[("A", "ES=0.1")])
    )
    assert a.p_value == pytest.approx(hand_t(pair_minus_single)[1], rel=1e-6)
    b = lb.loc["B"]
    assert b.best_single == "HSU=0.2" and not b.pair_better


def test_missing_control_or_columns_raise():
    df = table()
    with pytest.raises(DataError, match="control"):
        paired_deltas(df[df.variant != "no-reg"])
    with pytest.raises(DataError, match="lacks"):
        paired_deltas(df.drop(columns="seed"))
    with pytest.raises(DataError, match="empty"):
        paired_deltas(df.iloc[:0])


def hidden_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for base in CONTROL:
        for variant in META:
            for seed in range(2):
                for scheme in ("int4 sym per-row", "int8 sym per-row"):
                    rows.append(
                        {
                            "source": "qlab",
                            "base": base,
                            "variant": variant,
                            "seed": seed,
                            "scheme": scheme,
                            "l2_distortion": rng.uniform(0.1, 1),
                            "cos_shift": rng.uniform(0, 0.01),
                            "mean_abs_cos_post": rng.uniform(0.2, 0.5),
                            "eff_rank_post": rng.uniform(10, 30),
                            "lambda": 0.1,
                        }
                    )
    return pd.DataFrame(rows)


def test_figures_from_results():
    from qlab.plots.matrix import hidden_heatmap_rows, matrix_figures, plot_paired_deltas

    df = table().assign(pre_quant_bpb=lambda d: d.final_bpb - 0.01, quantized_bpb=lambda d: d.final_bpb)
    h = hidden_heatmap_rows(hidden_table())
    assert len(h) == 2 * 4 * 2 and h.variant.iloc[0] == "A · no-reg"
    expect = hidden_table().query("base == 'A' and variant == 'no-reg' and scheme == 'int8 sym per-row'")
    assert h.l2_distortion.iloc[1] == pytest.approx(expect.l2_distortion.mean())
    figs = matrix_figures(MatrixResults(df, hidden_table(), pd.DataFrame()), policy="p6")
    assert {
        "matrix_hidden_heatmaps",
        "matrix_paired_deltas",
        "matrix_cross_base_signs",
        "matrix_lambda_budget_A",
        "matrix_pre_post_quant",
    } <= set(figs)
    assert all(isinstance(f, Figure) for f in figs.values())
    fig = plot_paired_deltas(paired_deltas(df[df.policy == "p6"], group=None))
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    with pytest.raises(DataError):
        plot_paired_deltas(pd.DataFrame(columns=["base"]))


def test_paired_delta_figure_marks_significance_and_says_when_no_test_is_possible():
    from qlab.plots.matrix import plot_paired_deltas

    rows = pd.DataFrame(
        {"base": "A", "variant": ["x", "y"], "metric": "final_bpb", "unit": "mBPB", "n_pairs": 3,
         "delta_mean": [-4.0, 0.5], "delta_ci95": [1.0, 2.0], "seed_noise": 1.5,
         "significant": np.array([True, False])}  # numpy bools, as paired_deltas' column can be
    )  # fmt: skip
    fig = plot_paired_deltas(rows)
    texts = [t.get_text().strip() for ax in fig.axes for t in ax.texts]
    assert "-4*" in texts and "+0.5" in texts
    one = plot_paired_deltas(rows.assign(n_pairs=1, delta_ci95=np.nan, significant=pd.NA))
    assert "no interval and no test" in one._suptitle.get_text()
    assert not any("*" in t.get_text() for ax in one.axes for t in ax.texts)


def test_pre_post_tax_is_paired_per_seed_with_a_t_interval():
    from qlab.analysis.matrix.stats import t_halfwidth
    from qlab.plots.pr2011 import _pre_post_rows

    df = table()
    df = df[df.policy == "p6"].assign(pre_quant_bpb=lambda d: d.final_bpb - 0.002 * (1 + d.seed))
    df = df.assign(quantized_bpb=df.final_bpb)
    rows = _pre_post_rows(df)
    assert len(rows) == df.groupby(["base", "variant"]).ngroups
    r = rows.iloc[0]
    g = df[(df.base == r.base) & (df.variant == r["name"])]
    tax = 1e3 * (g.quantized_bpb - g.pre_quant_bpb).to_numpy()
    assert r.tax == pytest.approx(tax.mean()) and r.tax_err == pytest.approx(t_halfwidth(tax))
    assert t_halfwidth(np.array([1.0, 3.0])) == pytest.approx(stats.t.ppf(0.975, 1) * np.sqrt(2) / np.sqrt(2))

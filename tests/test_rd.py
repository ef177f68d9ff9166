"""Rate–distortion sweeps: monotonicity, (b, k) ≈ (b+1, 2k), std vs ratio, R–D bound,
Hessian error, Δbpb with weight restore, byte allocation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qlab.analysis import rd, rd_compare, rd_theory
from qlab.errors import ConfigError, QuantError


def gauss(rows: int, cols: int, sigma: float, seed: int) -> torch.Tensor:
    return sigma * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mats() -> dict[str, torch.Tensor]:
    lap = torch.distributions.Laplace(0.0, 0.02)
    torch.manual_seed(0)
    return {
        "blocks.0.mlp.fc.weight": gauss(256, 128, 0.02, 1),
        "blocks.0.attn.c_q.weight": lap.sample((128, 128)),
    }


def test_linear_fit_by_hand():
    fit = rd.linear_fit([0, 1, 2, 3], [1, 3, 5, 7.0])
    assert (fit.slope, fit.intercept, fit.r2, fit.n) == pytest.approx((2.0, 1.0, 1.0, 4))
    fit = rd.linear_fit([0, 1, 2], [0, 2, 1.0])  # ŷ = 0.5 + 0.5x: SS_res 1.5, SS_tot 2
    assert fit.r2 == pytest.approx(0.25)
    assert math.isnan(rd.linear_fit([1, 1], [2, 3]).r2)


def test_sweep_bytes_fall_as_k_rises(mats):
    df = rd.sweep(mats, bits=(4, 6), ks=(4, 8, 12, 16, 20), clip_rules=("sdclip", "quantile_search"))
    assert len(df) == 2 * 2 * (5 + 1)
    for (_, _), g in df[df["rule"] == "sdclip"].groupby(["name", "bits"]):
        g = g.sort_values("k")
        assert (np.diff(g["predicted_bytes"]) < 0).all()
        assert (np.diff(g["entropy"]) < 0).all()
        assert np.allclose(g["k_eff"], g["k"], rtol=2e-3)  # fp16 scale rounding only
    # int6 has lower error than int4 at the same k; MSE relative to σ² is scale-free
    six = df[(df["rule"] == "sdclip") & (df["bits"] == 6)].set_index(["name", "k"])["rel_mse"]
    four = df[(df["rule"] == "sdclip") & (df["bits"] == 4)].set_index(["name", "k"])["rel_mse"]
    assert (six < four).all()
    g = df[(df["name"] == "blocks.0.mlp.fc.weight") & (df["rule"] == "sdclip") & (df["bits"] == 6)]
    theory = [rd_theory.gaussian_quant_entropy(6, k) for k in g["k"]]
    assert np.allclose(g["entropy"], theory, atol=0.03)
    assert df["hessian_err"].isna().all() and df["real_bytes"].isna().all()


def test_sweep_real_bytes_close_to_predicted(mats):
    df = rd.sweep(mats, bits=(6,), ks=(12.85,), clip_rules=("sdclip",), real_bytes=True)
    assert np.allclose(df["real_bytes"], df["predicted_bytes"], rtol=0.03)


def test_hessian_error_is_the_trace():
    w, w_hat = gauss(8, 5, 1.0, 2), gauss(8, 5, 1.0, 3)
    x = gauss(20, 5, 1.0, 4)
    h = x.T @ x
    d = w - w_hat
    assert rd.hessian_error(w, w_hat, h) == pytest.approx(float(torch.trace(d @ h @ d.T)), rel=1e-5)
    with pytest.raises(QuantError):
        rd.hessian_error(w, w_hat, torch.eye(4))


def test_sweep_with_hessians_and_hessian_rule(mats):
    hs = {}
    for n, w in mats.items():
        x = gauss(512, w.shape[1], 1.0, 5) * torch.linspace(0.2, 2, w.shape[1])
        hs[n] = x.T @ x / 512
    df = rd.sweep(mats, bits=(5,), ks=(10,), clip_rules=("sdclip", "hessian_sdclip"), hessians=hs)
    assert df["hessian_err"].notna().all() and (df["hessian_err"] > 0).all()
    with pytest.raises(ConfigError, match="hessian_sdclip"):
        rd.sweep(mats, bits=(5,), ks=(10,), clip_rules=("hessian_sdclip",))


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(128, 96, bias=False)
        self.proj = nn.Linear(96, 64, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(96, 128, generator=g) / 11)
            self.proj.weight.copy_(torch.randn(64, 96, generator=g) / 10)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


def output_error_fn(model: nn.Module):
    """A stand-in for val_bpb: MSE of the model's output against the original model's."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(x).clone()

    def fn(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m(x) - ref) ** 2).mean())

    return fn


def test_sweep_delta_bpb_and_restore():
    model = TwoLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn = output_error_fn(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    df = rd.sweep(sd, bits=(3, 6), ks=(8.0,), clip_rules=("sdclip",), model=model, eval_fn=fn, min_numel=1000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    d = df.groupby("bits")["delta_bpb"].first()
    assert d[3] > d[6] > 0
    assert (df.groupby("bits")["delta_bpb"].nunique() == 1).all()
    with pytest.raises(ConfigError):
        rd.sweep(sd, bits=(3,), ks=(8,), model=model, min_numel=1000)


def test_compare_sdclip_quantile_predictability(mats):
    cmp = rd.compare_sdclip_quantile(mats, bits=(6,), ks=(6, 9, 12, 15, 18))
    sd = cmp[cmp["rule"] == "sdclip"]
    assert len(sd) == 5 and (sd["r2_size_vs_k"] > 0.99).all()
    assert set(cmp["rule"]) == {"sdclip", "quantile_search"}
    assert {"predicted_bytes", "rel_mse", "seconds", "bits_per_param"} <= set(cmp.columns)
    total = rd.summarize_sweep(rd.sweep(mats, bits=(6,), ks=(12,), clip_rules=("sdclip",)))
    per = rd.sweep(mats, bits=(6,), ks=(12,), clip_rules=("sdclip",))
    assert total["predicted_bytes"].iloc[0] == pytest.approx(per["predicted_bytes"].sum())


def test_bk_equivalence_on_gaussian_data():
    big = {"w": gauss(1024, 512, 0.02, 7)}
    df = rd.bk_equivalence(big, bits=(4, 5, 6), ks=(4.0, 6.0), min_numel=0)
    pr = df[df["convention"] == "pr"]
    # same step: only the tail bins differ; measured entropies follow the Gaussian theory
    assert (pr["entropy_gap"].abs() < 0.02).all()
    assert np.allclose(pr["entropy_bk"], pr["gauss_entropy_bk"], atol=0.01)
    assert (pr["bytes_ratio"].sub(1).abs() < 0.02).all()
    q = df[df["convention"] == "qlab"]
    r = 2 ** (q["bits"] - 1) - 1
    # ours: the (b+1, 2k) step is finer by 2R/(2R+1), entropy higher by ≈ log2((2R+1)/2R)
    assert np.allclose(q["entropy_gap"], np.log2((2 * r + 1) / (2 * r)), atol=0.02)


def test_std_vs_ratio_high_r2_with_varying_sigma():
    # Over a trained model's typical σ spread the ratio is close to linear in σ ...
    sigmas = np.geomspace(0.016, 0.024, 10)
    tensors = {f"m{i}": gauss(128, 256, float(s), i) for i, s in enumerate(sigmas)}
    res = rd_compare.std_vs_ratio(tensors, bits=6)
    assert res.clip == pytest.approx(12.85 * float(np.median(res.table["std"])))
    assert res.fit.slope < 0 and res.fit.r2 > 0.98
    # ... while bits/param is linear in log2 σ (slope 1) over any spread
    wide = {f"m{i}": gauss(128, 256, float(s), i) for i, s in enumerate(np.geomspace(0.01, 0.04, 10))}
    res = rd_compare.std_vs_ratio(wide, bits=6)
    assert res.log_fit.r2 > 0.999 and res.log_fit.slope == pytest.approx(1.0, abs=0.05)
    fixed_k = {n: w / w.std() * 0.02 for n, w in tensors.items()}  # same σ: nothing to regress
    flat = rd_compare.std_vs_ratio(fixed_k, bits=6)
    assert flat.table["ratio"].std() / flat.table["ratio"].mean() < 0.01
    with pytest.raises(ConfigError):
        rd_compare.std_vs_ratio(tensors, clip=-1.0)


def test_rd_curve_never_beats_the_shannon_bound(mats):
    df = rd_compare.rd_curve(mats, bits=(2, 4, 6, 8), ks=(4.0, 12.85), lloyd_levels=(4, 16))
    assert set(df["quantizer"]) >= {"nf4", "lloyd-max", "int6 sdclip"}
    assert (df["distortion"] > df["rd_bound"]).all()
    assert np.allclose(df["ecsq"] / df["rd_bound"], math.pi * math.e / 6)
    hi = df[(df["quantizer"] == "int8 sdclip") & (df["k"] == 12.85)].iloc[0]
    assert hi["gap_db"] == pytest.approx(10 * math.log10(math.pi * math.e / 6), abs=0.6)
    assert (df["rate_with_scales"] > df["rate"]).all()
    grid = rd_compare.rd_bounds([0, 1, 2])
    assert list(grid["rd_bound"]) == [1.0, 0.25, 0.0625]

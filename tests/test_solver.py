"""Budget solver: size falls and distortion rises with k; the solved k is the smallest that fits."""

from __future__ import annotations

import pytest
import torch

from qlab.compress.budget import measure_artifact_bytes
from qlab.compress.solver import distortion, group_members, size_curve, solve_bits, solve_k
from qlab.errors import ConfigError, QuantError
from qlab.quant.policy import Policy, Rule, TensorSpec, quantize_state_dict


def _sd() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "tok_emb.weight": 0.05 * torch.randn(256, 64, generator=g),
        "blocks.0.attn.c_q.weight": 0.05 * torch.randn(64, 64, generator=g),
        "blocks.0.attn.proj.weight": 0.05 * torch.randn(64, 64, generator=g),
        "blocks.0.mlp.fc.weight": 0.05 * torch.randn(128, 64, generator=g),
        "blocks.0.mlp.proj.weight": 0.05 * torch.randn(64, 128, generator=g),
        "blocks.0.attn_scale": torch.rand(64, generator=g),
    }


def _policy(mlp_k: float = 12.85) -> Policy:
    def rtn(bits: int, k: float) -> TensorSpec:
        return TensorSpec(method="rtn", bits=bits, clip="sdclip", clip_params={"k": k})

    return Policy(
        "t",
        [
            Rule("tok_emb.weight", rtn(8, 20.0)),
            Rule("*.mlp.*", rtn(6, mlp_k), ndim=2),
            Rule("*", rtn(6, 12.85), ndim=2),
            Rule("*", TensorSpec(method="passthrough")),
        ],
    )


def _measured_at(sd, policy, k) -> int:
    curve = size_curve(sd, policy, [k], measure=True)
    return int(curve["measured_bytes"].iloc[0])


def test_size_falls_and_distortion_rises_with_k():
    sd, pol = _sd(), _policy()
    curve = size_curve(sd, pol, [4.0, 8.0, 16.0, 32.0], measure=True)
    assert curve["predicted_bytes"].is_monotonic_decreasing
    assert curve["measured_bytes"].is_monotonic_decreasing
    assert curve["distortion"].is_monotonic_increasing
    assert curve["predicted_bytes"].iloc[0] > 1.2 * curve["predicted_bytes"].iloc[-1]


def test_solve_k_is_the_smallest_fitting_k():
    sd, pol = _sd(), _policy()
    curve = size_curve(sd, pol, [8.0, 24.0])
    cap = int(curve["predicted_bytes"].mean())  # binds somewhere inside (8, 24)
    res = solve_k(sd, pol, cap, k_range=(4.0, 40.0), tol=0.05)
    assert res.fits and res.measured_bytes <= cap
    assert 8.0 < res.k < 24.0
    assert res.measured_bytes == measure_artifact_bytes(res.quantized_state, policy=res.policy.to_dict())
    assert _measured_at(sd, pol, 0.95 * res.k) > cap  # a slightly smaller k does not fit
    it = res.iterations
    assert {"bisect", "verify"} <= set(it["stage"])
    assert it.loc[it["stage"] == "verify", "measured_bytes"].notna().all()
    # only the matrices moved; the embedding keeps its k
    assert res.quantized_state["tok_emb.weight"].meta["clip_params"]["k"] == 20.0
    assert res.quantized_state["blocks.0.attn.c_q.weight"].meta["clip_params"]["k"] == pytest.approx(res.k)


def test_solve_k_keeps_ratios_and_reports_the_majority_k():
    sd = _sd()
    pol = _policy(mlp_k=6.425)  # mlp at half the attention k; mlp holds the most weights
    res = solve_k(sd, pol, 10**7, k_range=(4.0, 40.0), verify=False)
    assert res.k == 4.0  # the cap does not bind: the smallest k wins
    q = res.quantized_state
    assert q["blocks.0.mlp.fc.weight"].meta["clip_params"]["k"] == pytest.approx(4.0)
    assert q["blocks.0.attn.c_q.weight"].meta["clip_params"]["k"] == pytest.approx(8.0)


def test_solve_k_errors():
    sd, pol = _sd(), _policy()
    with pytest.raises(QuantError, match="even k=40"):
        solve_k(sd, pol, 1000, verify=False)
    with pytest.raises(ConfigError, match="selects no tensor"):
        solve_k(sd, pol, 10**6, group="nothing.*")
    with pytest.raises(ConfigError, match="k_range"):
        solve_k(sd, pol, 10**6, k_range=(10.0, 5.0))
    assert group_members(sd, pol, "embedding") == ["tok_emb.weight"]
    assert "tok_emb.weight" not in group_members(sd, pol, "matrices")


def test_distortion_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    pol = Policy("t", [Rule("*", TensorSpec(method="rtn", bits=2, clip="absmax"))])
    q = quantize_state_dict({"w": w}, pol)
    e = w - q["w"].codes.float() * q["w"].scale.float()
    h = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    assert distortion({"w": w}, q, ["w"]) == pytest.approx(float((e**2).sum()))
    want = sum(float(e[i] @ h @ e[i]) for i in range(2))
    assert distortion({"w": w}, q, ["w"], {"w": h}) == pytest.approx(want)


def test_solve_bits_greedy_fits_and_tightens_monotonically():
    sd, pol = _sd(), _policy()
    wide = solve_bits(sd, pol, 10**7, verify=False)
    assert wide.bits == {"embedding": 8, "attention": 8, "mlp": 8}
    loose = solve_bits(sd, pol, int(0.8 * wide.predicted_bytes))
    tight = solve_bits(sd, pol, int(0.6 * wide.predicted_bytes))
    for res, frac in ((loose, 0.8), (tight, 0.6)):
        assert res.fits and res.measured_bytes <= int(frac * wide.predicted_bytes)
        assert set(res.bits.values()) <= {4, 5, 6, 7, 8}
    assert all(tight.bits[g] <= loose.bits[g] for g in loose.bits)
    assert tight.iterations["distortion"].iloc[-1] > loose.iterations["distortion"].iloc[-1]
    with pytest.raises(QuantError, match="even at"):
        solve_bits(sd, pol, 1000, verify=False)

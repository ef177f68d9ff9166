"""Rate-aware GPTQ against plain GPTQ's k frontier: policies, paired rows, the saving."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from qlab.analysis.allocator import allocation_rows
from qlab.analysis.frontier import PLAIN, RATE_AWARE, bytes_saved_at_equal_bpb, gptq_variant, rate_frontier
from qlab.compress.container import encode_artifact
from qlab.errors import ConfigError
from qlab.eval.context import EvalContext
from qlab.plots.allocation import plot_allocation, plot_rate_frontier
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import Policy, Rule, TensorSpec
from tests.test_pipeline import _model, _policy


def test_gptq_variant_sets_k_and_lambda_on_the_matrices_only():
    model = _model()
    sd = model.state_dict()
    pol = gptq_variant(_policy(), sd, 9.5, 0.3)
    for name, t in sd.items():
        spec, base = pol.spec_for(name, t), _policy().spec_for(name, t)
        if base.method == "gptq" and name != "tok_emb.weight":
            assert spec.clip_params["k"] == 9.5 and spec.gptq_rate_lambda == 0.3
        else:
            assert spec == base  # the embedding and everything else as the base policy has it
    rtn_only = Policy("rtn", [Rule("*", TensorSpec(method="rtn", bits=6))])
    with pytest.raises(ConfigError, match="no GPTQ matrix"):
        gptq_variant(rtn_only, sd, 10.0)


@pytest.fixture(scope="module")
def frontier(tiny_dataset):
    ctx = EvalContext.open(_model(), tiny_dataset)
    hessians = ctx.hessians(_policy(), 2, 2)
    df = rate_frontier(ctx.model, _policy(), hessians, ctx.val_tokens, ctx.byte_tables, seq_len=ctx.seq_len,
                       ks=(8.0, 12.85, 20.0), lambdas=(0.0, 1.0), max_tokens=800, n_boot=200)  # fmt: skip
    return ctx, hessians, df


def test_the_base_point_is_paired_with_itself_and_bytes_are_the_real_artifact(frontier):
    ctx, hessians, df = frontier
    assert list(df["method"]) == [PLAIN] * 3 + [RATE_AWARE] * 2
    base = df[(df["method"] == PLAIN) & (df["k"] == 12.85)].iloc[0]
    assert base["delta_bpb"] == 0.0 and base["ci_lo"] == 0.0 == base["ci_hi"]
    assert base["artifact_bytes"] == base["base_bytes"]
    # λ = 0 at the base k is plain GPTQ: the same artifact, the same bpb
    zero = df[(df["method"] == RATE_AWARE) & (df["rate_lambda"] == 0.0)].iloc[0]
    assert zero["artifact_bytes"] == base["artifact_bytes"] and zero["delta_bpb"] == 0.0
    pol = gptq_variant(_policy(), ctx.model.state_dict(), 20.0)
    qm = quantize_model(ctx.model, pol, hessians=hessians)
    wide = df[(df["method"] == PLAIN) & (df["k"] == 20.0)].iloc[0]
    assert wide["artifact_bytes"] == len(
        encode_artifact(qm.quantized_state, policy=pol.to_dict(), codec="ans")
    )
    assert (df["ci_lo"] <= df["delta_bpb"] + 1e-12).all() and (df["delta_bpb"] <= df["ci_hi"] + 1e-12).all()
    assert math.isclose(base["val_bpb"], base["base_bpb"])


def test_saving_at_equal_bpb_interpolates_the_plain_curve():
    rows = [(PLAIN, 8.0, 0.0, 1000, 0.000), (PLAIN, 12.0, 0.0, 800, 0.002), (PLAIN, 20.0, 0.0, 600, 0.006),
            (RATE_AWARE, 12.0, 1.0, 700, 0.004), (RATE_AWARE, 12.0, 3.0, 500, 0.010)]  # fmt: skip
    df = pd.DataFrame(rows, columns=["method", "k", "rate_lambda", "artifact_bytes", "delta_bpb"])
    df = df.assign(ci_lo=df["delta_bpb"] - 0.001, ci_hi=df["delta_bpb"] + 0.001)
    saved = bytes_saved_at_equal_bpb(df)
    assert list(saved["rate_lambda"]) == [1.0]  # λ = 3 lies beyond the plain curve: not extrapolated
    assert saved["plain_bytes"].iloc[0] == pytest.approx(700.0)  # halfway between 800 and 600
    assert saved["saving"].iloc[0] == pytest.approx(0.0)
    assert saved["ci_hi"].iloc[0] == pytest.approx(0.005)
    # the same on the quiet signal: its own column and interval
    kl = df.assign(
        delta_kl=df["delta_bpb"] / 2, kl_lo=df["delta_bpb"] / 2 - 1e-4, kl_hi=df["delta_bpb"] / 2 + 1e-4
    )
    saved_kl = bytes_saved_at_equal_bpb(kl, signal="kl")
    assert list(saved_kl.columns[1:4]) == ["delta_kl", "kl_lo", "kl_hi"]
    assert saved_kl["plain_bytes"].iloc[0] == pytest.approx(700.0) and saved_kl["kl_hi"].iloc[
        0
    ] == pytest.approx(0.0021)
    with pytest.raises(ConfigError):
        bytes_saved_at_equal_bpb(df, signal="nats")


def test_allocation_rows_and_the_two_figures(frontier):
    result = {
        "choice": {"mlp": "k*1.25"}, "predicted_bpb": -0.001,
        "vs_base": {"base_bytes": 1000, "bytes": 990, "delta_bpb": -0.002, "ci_lo": -0.003, "ci_hi": -0.001,
                    "delta_kl": -0.001, "kl_lo": -0.0015, "kl_hi": -0.0005},
        "vs_uniform": {"base_bytes": 989, "bytes": 990, "delta_bpb": -0.001, "ci_lo": -0.004, "ci_hi": 0.002,
                       "delta_kl": -0.0004, "kl_lo": -0.0007, "kl_hi": -0.0001},
        "uniform_k": 13.1,
    }  # fmt: skip
    rows = allocation_rows(result)
    assert list(rows["comparison"]) == ["vs base policy", "vs uniform k at equal bytes"]
    assert list(rows["resolved"]) == [True, False] and rows["choice"].iloc[0] == "mlp k*1.25"
    assert list(rows["kl_resolved"]) == [True, True]  # the quiet signal resolves what Δbpb does not
    assert allocation_rows({"choice": {}, "predicted_bpb": 0.0}).empty
    for fig in (plot_allocation(rows), plot_allocation(rows.iloc[:0]), plot_rate_frontier(frontier[2])):
        assert fig.axes and fig.axes[0].get_xlabel()

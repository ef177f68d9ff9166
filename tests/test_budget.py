"""Byte accounting: code bytes (raw / lzma stub), per-tensor breakdown, totals vs the cap."""

from __future__ import annotations

import lzma

import pytest
import torch

from qlab.compress.budget import (
    CAP,
    budget_table,
    code_bytes,
    lzma_wrap,
    measure_artifact_bytes,
    predict_artifact_bytes,
)
from qlab.compress.container import encode_artifact
from qlab.compress.ptz import ptz_bytes, ptz_tree
from qlab.errors import ConfigError, DataError
from qlab.quant.policy import Policy, Rule, TensorSpec, quantize_state_dict


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {
        "tok_emb.weight": 0.05 * torch.randn(256, 64, generator=g),
        "blocks.0.attn.c_q.weight": 0.05 * torch.randn(64, 64, generator=g),
        "blocks.0.mlp.fc.weight": 0.05 * torch.randn(128, 64, generator=g),
        "blocks.0.attn_scale": torch.rand(64, generator=g),
    }
    policy = Policy(
        "t",
        [
            Rule("tok_emb.weight", TensorSpec(method="rtn", bits=8, clip="sdclip", clip_params={"k": 20.0})),
            Rule("*", TensorSpec(method="rtn", bits=6, clip="sdclip", clip_params={"k": 12.85}), ndim=2),
            Rule("*", TensorSpec(method="passthrough", passthrough_dtype="fp16")),
        ],
    )
    return quantize_state_dict(sd, policy), policy


def test_cap_is_decimal():
    assert CAP == 16 * 10**6


def test_code_bytes_raw_counts_utf8(tmp_path):
    text = "x = 'é'\n"  # é is two UTF-8 bytes
    assert code_bytes(text) == len(text) + 1
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("print(1)\n", encoding="utf-8")
    b.write_text("y = 2\n", encoding="utf-8")
    assert code_bytes(a) == 9
    assert code_bytes([a, str(b)]) == 9 + 6


def test_lzma_wrap_runs_the_code_and_is_counted():
    code = "result = sum(range(10))\n" + "# padding line to compress\n" * 400
    stub = lzma_wrap(code)
    ns: dict = {}
    exec(stub, ns)  # the stub must reproduce the program
    assert ns["result"] == 45
    assert code_bytes(code, wrap="lzma") == len(stub.encode("utf-8"))
    assert code_bytes(code, wrap="lzma") < code_bytes(code) / 5
    # the payload is the xz stream of the code, base85-encoded
    import base64

    payload = stub.split('b85decode("')[1].split('")')[0]
    assert lzma.decompress(base64.b85decode(payload)).decode() == code


def test_code_bytes_errors(tmp_path):
    with pytest.raises(ConfigError, match="wrap"):
        code_bytes("x", wrap="zip")
    with pytest.raises(DataError, match="missing.py"):
        code_bytes([tmp_path / "missing.py"])


def test_budget_table_sums_and_headroom():
    q, policy = _state()
    code = 1234
    df = budget_table(q, code=code, cap=100_000, policy=policy.to_dict())
    rows = df.set_index("name")
    tensors = df[~df["name"].str.startswith("[")]
    assert list(tensors["name"]) == list(q)
    model = rows.loc["[model]", "compressed_bytes"]
    assert tensors["compressed_bytes"].sum() + rows.loc["[overhead]", "compressed_bytes"] == pytest.approx(
        model
    )
    assert rows.loc["[artifact]", "compressed_bytes"] == model + code
    assert rows.loc["[artifact]", "headroom_bytes"] == 100_000 - (model + code)
    parts = df[~df["name"].isin(["[model]", "[artifact]"])]
    assert parts["share"].sum() == pytest.approx(1.0)
    assert df.attrs["fits"] == (model + code <= 100_000)
    assert model == predict_artifact_bytes(q, policy=policy.to_dict())


def test_budget_table_raw_bytes_and_kinds_by_hand():
    q, _ = _state()
    rows = budget_table(q).set_index("name")
    # int6 per-row: 64*64 int8 codes + 64 fp16 scales (codes end 8-byte aligned)
    assert rows.loc["blocks.0.attn.c_q.weight", "raw_bytes"] == 64 * 64 + 64 * 2
    assert rows.loc["blocks.0.attn.c_q.weight", "kind"] == "rtn"
    assert rows.loc["blocks.0.attn.c_q.weight", "bits"] == 6
    assert rows.loc["blocks.0.attn.c_q.weight", "k"] == 12.85
    assert rows.loc["tok_emb.weight", "k"] == 20.0
    assert rows.loc["blocks.0.attn_scale", "kind"] == "passthrough:fp16"
    assert rows.loc["blocks.0.attn_scale", "raw_bytes"] == 64 * 2
    assert rows.loc["[model]", "numel"] == 256 * 64 + 64 * 64 + 128 * 64 + 64


def test_measured_totals_are_the_real_artifacts():
    q, policy = _state()
    df = budget_table(q, predicted=False, policy=policy.to_dict(), code=10)
    real = len(encode_artifact(q, policy=policy.to_dict(), codec="brotli-11"))
    assert df.attrs["model_bytes"] == real
    assert df.attrs["artifact_bytes"] == real + 10
    assert measure_artifact_bytes(q, fmt="ptz") == len(ptz_bytes(ptz_tree(q)))
    # the prediction is close to the real brotli-11 size for both layouts
    assert predict_artifact_bytes(q, policy=policy.to_dict()) == pytest.approx(real, rel=0.03)
    assert predict_artifact_bytes(q, fmt="ptz") == pytest.approx(
        measure_artifact_bytes(q, fmt="ptz"), rel=0.03
    )


def test_budget_table_rejects_bad_cap_and_format():
    q, _ = _state()
    with pytest.raises(ConfigError, match="cap"):
        budget_table(q, cap=0)
    with pytest.raises(ConfigError, match="format"):
        budget_table(q, fmt="zip")

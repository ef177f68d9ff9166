"""Whole-model quantization: Hessians on the policy's GPTQ tensors, bit-exact artifact round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab.compress.container import encode_artifact
from qlab.compress.ptz import ptz_tree, write_ptz
from qlab.config import ModelConfig
from qlab.errors import ArtifactError, DataError, QuantError
from qlab.loaders import load_quantized, save_quantized
from qlab.loaders.readers import load_state_dict
from qlab.model.gpt import GPT
from qlab.quant.model_quant import (
    calibration_batches,
    dequantize_entries,
    gptq_names,
    model_hessians,
    quantize_model,
)
from qlab.quant.policy import Policy, Rule, TensorSpec, dequantize_state_dict, quantize_state_dict

CFG = ModelConfig(
    vocab_size=512, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
    loop_layers=None, train_seq_len=32, eval_seq_len=32,
)  # fmt: skip


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():  # non-zero matrices (the model zero-inits its output projections)
        for p in model.parameters():
            if p.dim() == 2 and p.numel() > 1024:
                p.normal_(0.0, 0.05)
    return model


def tiny_policy() -> Policy:
    def gptq(bits: int, k: float) -> TensorSpec:
        return TensorSpec(method="gptq", bits=bits, clip="sdclip", clip_params={"k": k})

    return Policy(
        "tiny",
        [
            Rule("tok_emb.weight", gptq(8, 20.0)),
            Rule("*", gptq(6, 12.85), ndim=2, min_numel=1025),  # GPTQ on the 2K..8K-weight matrices
            Rule("*", TensorSpec(method="passthrough", passthrough_dtype="fp16")),
        ],
    )


@pytest.fixture(scope="module")
def quantized():
    model = tiny_model()
    batches = [torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, quantize_model(model, tiny_policy(), batches)


def _assert_state_equal(model: nn.Module, want: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t.to(got[name].dtype)), name


def test_hessians_cover_exactly_the_gptq_tensors():
    model, policy = tiny_model(), tiny_policy()
    names = gptq_names(model.state_dict(), policy)
    assert "tok_emb.weight" in names and "blocks.0.attn.c_k.weight" in names
    assert "blocks.0.resid_mix" not in names
    h = model_hessians(model, policy, [torch.randint(0, 512, (2, 32))])
    assert set(h) == set(names)
    assert h["blocks.0.mlp.proj.weight"].shape == (128, 128)


def test_quantize_model_runs_gptq_and_leaves_the_input_alone(quantized):
    model, qm = quantized
    fresh = tiny_model()
    for name, t in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name  # input model unchanged
    assert qm.hessians_used and not qm.meta["rtn_fallback"]
    assert set(qm.meta["gptq_tensors"]) == set(gptq_names(model.state_dict(), tiny_policy()))
    assert qm.meta["calib_batches"] == 3
    _assert_state_equal(qm.dequantized_model, dequantize_state_dict(qm.quantized_state))
    w, wq = model.tok_emb.weight.detach(), qm.dequantized_model.tok_emb.weight.detach()
    assert not torch.equal(w, wq) and float((w - wq).abs().max()) < 0.05


def test_without_calibration_gptq_falls_back_to_rtn():
    qm = quantize_model(tiny_model(), tiny_policy())
    assert not qm.hessians_used
    assert "blocks.1.mlp.fc.weight" in qm.meta["rtn_fallback"]


def test_artifact_round_trip_is_bit_exact(quantized, tmp_path):
    model, qm = quantized
    path = save_quantized(tmp_path / "m.qlab", qm, tiny_policy())
    loaded = load_quantized(path)  # the model is rebuilt from the header's config
    want = dequantize_state_dict(qm.quantized_state)
    _assert_state_equal(loaded.model, want)
    assert loaded.header["extra"]["model_config"] == CFG.to_dict()
    x = torch.randint(0, 512, (2, 32))
    assert torch.equal(loaded.model(x), qm.dequantized_model(x))
    # and into a caller's model
    other = tiny_model(seed=5)
    load_quantized(path, other)
    _assert_state_equal(other, want)


def test_corrupt_truncated_tampered_artifacts_fail(quantized, tmp_path):
    _, qm = quantized
    data = (save_quantized(tmp_path / "ok.qlab", qm, tiny_policy())).read_bytes()
    bad = tmp_path / "bad.qlab"
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    header = bytearray(data)
    header[60] ^= 0x01  # inside the (compressed) header: caught by the header's own SHA-256
    cases = {
        "SHA-256": bytes(flipped),
        "truncated": data[: len(data) - 10],
        "bad magic": b"XXXX" + data[4:],
        "tampered header": bytes(header),
    }
    for blob in cases.values():
        assert blob != data
        bad.write_bytes(blob)
        with pytest.raises(ArtifactError):
            load_quantized(bad)


def test_artifact_without_model_config_needs_a_model(quantized, tmp_path):
    _, qm = quantized
    path = tmp_path / "plain.qlab"
    path.write_bytes(encode_artifact(qm.quantized_state, codec="zstd"))
    with pytest.raises(ArtifactError, match="model_config"):
        load_quantized(path)
    model = tiny_model(seed=3)
    load_quantized(path, model)
    _assert_state_equal(model, dequantize_state_dict(qm.quantized_state))
    wrong = GPT(CFG.replace(model_dim=32, num_heads=2))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_quantized(path, wrong)


def test_ptz_round_trip_is_bit_exact(quantized, tmp_path):
    _, qm = quantized
    path = write_ptz(ptz_tree(qm.quantized_state), tmp_path / "m.ptz")
    sd = load_state_dict(path)  # the Parameter Golf reader, weights_only
    model = tiny_model(seed=9)
    model.load_state_dict(sd)
    _assert_state_equal(model, dequantize_state_dict(qm.quantized_state))


def test_ptz_tree_refuses_what_a_ptz_cannot_hold():
    w = torch.randn(8, 16)
    pol = Policy("a", [Rule("*", TensorSpec(method="rtn", bits=4, clip="absmax", symmetric=False))])
    with pytest.raises(QuantError, match="symmetric"):
        ptz_tree(quantize_state_dict({"w": w}, pol))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_are_stored_once_and_stay_tied():
    model = _Tied()
    pol = Policy("t", [Rule("*", TensorSpec(method="rtn", bits=6, clip="sdclip", clip_params={"k": 8.0}))])
    qm = quantize_model(model, pol)
    assert qm.meta["aliases"] == {"head.weight": "emb.weight"}
    assert set(qm.quantized_state) == {"emb.weight"}
    out = qm.dequantized_model
    assert out.head.weight is out.emb.weight
    full = dequantize_entries(qm.quantized_state, qm.meta["aliases"])
    assert torch.equal(out.head.weight, full["head.weight"])


def test_calibration_batches(tiny_dataset):
    a = calibration_batches(tiny_dataset, 3, seq_len=32, batch_seqs=2, seed=1)
    b = calibration_batches(tiny_dataset, 3, seq_len=32, batch_seqs=2, seed=1)
    assert len(a) == 3 and a[0].shape == (2, 32) and a[0].dtype == torch.int64
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert int(max(x.max() for x in a)) < tiny_dataset.vocab_size
    with pytest.raises(DataError, match="positive"):
        calibration_batches(tiny_dataset, 0, seq_len=32)

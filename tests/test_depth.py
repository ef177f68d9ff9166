"""Depth trajectory, logit lens, layer sensitivity and activation capture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from qlab.analysis import activations, depth
from qlab.errors import ConfigError, DataError, QuantError

V, D, L = 11, 8, 3


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_q = nn.Linear(D, D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 2 * D, bias=False)
        self.proj = nn.Linear(2 * D, D, bias=False)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()
        self.mlp = _MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.proj(torch.tanh(self.attn.c_q(x)))
        return x + self.mlp.proj(F.relu(self.mlp.fc(x)))


class ToyLM(nn.Module):
    """Implements the GPT contract with a tied head and RMS final norm."""

    def __init__(self, loop: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(_Block() for _ in range(L))
        self.order = [0, 1, 1, 2] if loop else [0, 1, 2]

    def block_outputs(self, idx):
        x, outs = self.tok_emb(idx), []
        for i in self.order:
            x = self.blocks[i](x)
            outs.append(x)
        return outs

    def norm_and_logits(self, x):
        return F.linear(F.rms_norm(x, (D,)), self.tok_emb.weight)

    def final_hidden(self, idx):
        return F.rms_norm(self.block_outputs(idx)[-1], (D,))

    def forward(self, idx):
        return self.norm_and_logits(self.block_outputs(idx)[-1])


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, 9), generator=g), torch.randint(0, V, (2, 9), generator=g)


def test_trajectory_values_by_hand():
    model, (idx, tgt) = ToyLM(), _batch()
    df = depth.depth_trajectory(model, idx, tgt)
    assert list(df["position"]) == [0, 1, 2] and list(df["block"]) == [0, 1, 2]
    assert "lens_bits_per_token" in df.columns and "lens_bpb" not in df.columns
    with torch.no_grad():
        outs = [o.reshape(-1, D).double() for o in model.block_outputs(idx)]
        for row, h in zip(df.itertuples(), outs):
            assert row.mean_norm == pytest.approx(float(h.norm(dim=1).mean()))
            assert row.kurtosis == pytest.approx(
                float(np.mean(scipy.stats.kurtosis(h.numpy(), axis=1))), rel=1e-6
            )
            assert row.kurtosis_pooled == pytest.approx(scipy.stats.kurtosis(h.numpy().ravel()))
        nll = F.cross_entropy(model(idx).reshape(-1, V).double(), tgt.flatten(), reduction="sum").item()
    last = df.iloc[-1]
    assert last["lens_loss"] == pytest.approx(nll / tgt.numel())
    assert last["lens_bits_per_token"] == pytest.approx(nll / math.log(2) / tgt.numel())


def test_bpb_with_bytes():
    model, (idx, tgt) = ToyLM(), _batch()
    nbytes = torch.full(tgt.shape, 3)
    a = depth.depth_trajectory(model, idx, tgt, bytes_per_token=nbytes)
    b = depth.depth_trajectory(model, idx, tgt, total_bytes=3 * tgt.numel())
    np.testing.assert_allclose(a["lens_bpb"], b["lens_bpb"])
    base = depth.depth_trajectory(model, idx, tgt)
    np.testing.assert_allclose(a["lens_bpb"] * 3, base["lens_bits_per_token"])
    with pytest.raises(DataError):
        depth.depth_trajectory(model, idx, tgt, bytes_per_token=torch.ones(3))
    with pytest.raises(DataError):
        depth.depth_trajectory(model, idx, tgt, total_bytes=0)
    with pytest.raises(ConfigError):
        depth.depth_trajectory(model, idx, tgt, bytes_per_token=nbytes, total_bytes=5)
    with pytest.raises(DataError):
        depth.depth_trajectory(model, idx, tgt[:, :3])


def test_trajectory_without_targets_and_recurrence():
    df = depth.depth_trajectory(ToyLM(loop=True), _batch()[0])
    assert len(df) == 4 and "lens_loss" not in df.columns
    assert df["block"].isna().all()  # no layer_order → unlabelled executed positions


def test_sensitivity_restores_weights_exactly():
    model, (idx, tgt) = ToyLM(), _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def zero(name, w):
        seen.append(name)
        return torch.zeros_like(w)

    df = depth.layer_sensitivity(model, idx, tgt, zero, total_bytes=40)
    assert list(df["group"]) == ["block_0", "block_1", "block_2"]
    assert (df["n_matrices"] == 4).all() and (df["n_params"] == 2 * D * D + 4 * D * D).all()
    assert "blocks.0.attn.c_q.weight" in seen and "tok_emb.weight" not in seen
    assert (df["delta_loss"].abs() > 0).all()
    assert np.allclose(df["delta_bpb"], df["delta_loss"] * tgt.numel() / math.log(2) / 40)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ident = depth.layer_sensitivity(model, idx, tgt, lambda n, w: w, include_embedding=True)
    assert list(ident["group"])[-1] == "embedding"
    assert (ident["delta_loss"] == 0).all() and "bits_per_token" in ident.columns


def test_sensitivity_matches_manual_quantization():
    model, (idx, tgt) = ToyLM(), _batch()
    df = depth.layer_sensitivity(model, idx, tgt, lambda n, w: w.round(), families=["q"])
    with torch.no_grad():
        w = model.blocks[1].attn.c_q.weight
        orig = w.clone()
        w.copy_(orig.round())
        loss = F.cross_entropy(model(idx).reshape(-1, V).double(), tgt.flatten()).item()
        w.copy_(orig)
    assert df.set_index("group").loc["block_1", "loss"] == pytest.approx(loss)
    assert (df["n_matrices"] == 1).all()


def test_sensitivity_restores_after_failure():
    model, (idx, tgt) = ToyLM(), _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def flaky(name, w):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return w * 0

    with pytest.raises(RuntimeError):
        depth.layer_sensitivity(model, idx, tgt, flaky)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(QuantError):
        depth.layer_sensitivity(model, idx, tgt, lambda n, w: w[:1])
    with pytest.raises(QuantError):
        depth.layer_sensitivity(model, idx, tgt, lambda n, w: w * float("nan"))


def test_capture_hooks_and_cleanup():
    model, (idx, _) = ToyLM(loop=True), _batch()
    acts = activations.capture(model, idx)
    assert list(acts) == ["blocks.0", "blocks.1", "blocks.1#1", "blocks.2"]
    with torch.no_grad():
        outs = model.block_outputs(idx)
    torch.testing.assert_close(acts["blocks.1#1"], outs[2])
    assert all(not m._forward_hooks for m in model.modules())
    sub = activations.capture(model, idx, ["blocks.0.mlp.fc"])
    assert sub["blocks.0.mlp.fc"].shape == (2, 9, 2 * D)
    with pytest.raises(ConfigError):
        activations.capture(model, idx, ["blocks.9"])
    with pytest.raises(IndexError):
        activations.capture(model, torch.full((1, 3), 99))
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training  # mode restored


def test_capture_hidden_contract():
    model, (idx, _) = ToyLM(), _batch()
    hs = activations.capture_hidden(model, idx)
    assert list(hs) == ["block_0", "block_1", "block_2", "final"]
    assert hs["final"].shape == (2, 9, D)
    with pytest.raises(ConfigError):
        activations.capture_hidden(nn.Linear(2, 2), idx)


def test_real_tiny_gpt():
    gpt = pytest.importorskip("qlab.model.gpt")
    config = pytest.importorskip("qlab.config")
    torch.manual_seed(0)
    model = gpt.GPT(config.get_preset("tiny"))
    with torch.no_grad():  # zero-initialised projections make every block the identity
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.05)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    tgt = torch.randint(0, model.config.vocab_size, (2, 16))
    df = depth.depth_trajectory(model, idx, tgt, total_bytes=64)
    with torch.no_grad():
        n_exec = len(model.block_outputs(idx))
        loss = model(idx, tgt).item()
    assert len(df) == n_exec
    enc, dec = model.layer_order()
    assert list(df["block"]) == [*enc, *dec]
    model.set_looping(True)
    looped = depth.depth_trajectory(model, idx)
    assert len(looped) > n_exec and looped["block"].tolist() == sum(model.layer_order(), [])
    model.set_looping(False)
    assert df["lens_loss"].iloc[-1] == pytest.approx(loss, rel=1e-5)
    sens = depth.layer_sensitivity(model, idx, tgt, lambda n, w: (w * 8).round() / 8)
    assert len(sens) == len(model.blocks) and np.isfinite(sens["delta_loss"]).all()

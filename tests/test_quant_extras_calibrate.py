"""Post-quantization calibration of control tensors: only controls move, block MSE drops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlab.errors import QuantError
from qlab.quant.calibrate import block_mse, calibrate_controls, control_parameters
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize


class ToyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(2 * d, d)
        self.mlp_scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp_scale * self.proj(torch.relu(self.fc(self.norm(x))))


class Toy(nn.Module):
    """Smallest model with the block_outputs contract and named control tensors."""

    def __init__(self, d: int = 16, n: int = 3, vocab: int = 40) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(n))

    def block_outputs(self, idx: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.emb(idx), []
        for b in self.blocks:
            x = b(x)
            outs.append(x)
        return outs


def _quantize_matrices(model: nn.Module, bits: int, prefix: str) -> nn.Module:
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() == 2 and name.startswith(prefix) and name.endswith(".weight"):
                p.copy_(dequantize(quantize_rtn(p.detach(), bits)))
    return q


def test_control_parameters_selection():
    names = set(control_parameters(Toy()))
    kinds = ("norm.weight", "norm.bias", "proj.bias", "mlp_scale")
    assert names == {f"blocks.{i}.{s}" for i in range(3) for s in kinds}
    assert set(control_parameters(Toy(), ("*mlp_scale",), include_norms=False)) == {
        f"blocks.{i}.mlp_scale" for i in range(3)
    }


def test_calibration_fits_only_controls_and_lowers_block_mse():
    torch.manual_seed(0)
    fp = Toy()
    q = _quantize_matrices(fp, 2, "blocks.")
    batches = [torch.randint(0, 40, (4, 12)) for _ in range(3)]
    before = block_mse(fp, q, batches)
    frozen = {n: p.detach().clone() for n, p in q.named_parameters()}
    fp_state = {n: p.detach().clone() for n, p in fp.named_parameters()}
    q.train()
    table = calibrate_controls(fp, q, batches, steps=60, lr=1e-2)
    after = block_mse(fp, q, batches)
    assert list(table.columns) == ["step", "batch", "loss"] and len(table) == 60
    assert list(table["batch"][:4]) == [0, 1, 2, 0]
    assert (
        abs(table["loss"].iloc[0] - block_mse(fp, _quantize_matrices(fp, 2, "blocks."), batches[:1])) < 1e-6
    )
    assert after < 0.8 * before
    controls = set(control_parameters(q))
    for n, p in q.named_parameters():
        if n in controls:
            continue
        assert torch.equal(p, frozen[n]), n  # matrices and embeddings untouched
    assert any(not torch.equal(q.get_parameter(n), frozen[n]) for n in controls)
    assert all(torch.equal(p, fp_state[n]) for n, p in fp.named_parameters())
    assert all(p.requires_grad and p.grad is None for p in q.parameters())  # flags restored
    assert q.training


def test_calibration_errors():
    fp = Toy()
    with pytest.raises(QuantError, match="differ"):
        calibrate_controls(fp, Toy(d=8), [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(QuantError, match="no batches"):
        calibrate_controls(fp, copy.deepcopy(fp), [])
    with pytest.raises(QuantError, match="matches"):
        calibrate_controls(
            fp, copy.deepcopy(fp), [torch.zeros(1, 4, dtype=torch.long)], patterns=("x",), include_norms=False
        )
    with pytest.raises(QuantError, match="block_outputs"):
        calibrate_controls(nn.Linear(2, 2), nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_calibration_on_tiny_gpt():
    gpt = pytest.importorskip("qlab.model.gpt")
    config = pytest.importorskip("qlab.config")
    torch.manual_seed(0)
    fp = gpt.GPT(config.get_preset("tiny"))
    with torch.no_grad():  # stand in for training: zero-init projections would hide the quantization
        for name, p in fp.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2 and name.endswith(".weight"):
                p.normal_(0, 0.08)
    fp.eval()
    q = _quantize_matrices(fp, 3, "blocks.")
    batches = [torch.randint(0, 1024, (2, 32)) for _ in range(2)]
    before = block_mse(fp, q, batches)
    table = calibrate_controls(fp, q, batches, steps=25, lr=5e-3)
    after = block_mse(fp, q, batches)
    assert len(table) == 25
    assert after < 0.95 * before

"""QAT: fake quantization equals RTN dequantization; gradients pass straight through."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlab.errors import ConfigError, QuantError
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize
from qlab.train.qat import disable_qat, enable_qat, fake_quant, qat_modules


@pytest.mark.parametrize("bits,k", [(6, 12.85), (6, None), (4, 3.0), (8, 20.0)])
def test_fake_quant_equals_rtn_dequantized(bits, k):
    torch.manual_seed(bits)
    w = torch.randn(16, 40) * 0.05
    w[2] = 0.3  # constant row: SDClip has zero width and falls back to absmax
    w[5, 7] = 1.0  # an outlier that SDClip clips
    clip, params = ("sdclip", {"k": k}) if k is not None else ("absmax", None)
    ref = dequantize(quantize_rtn(w, bits, granularity="row", clip=clip, clip_params=params))
    torch.testing.assert_close(fake_quant(w, bits, k), ref, rtol=0, atol=0)


def test_fake_quant_hand_example():
    w = torch.tensor([[0.7, -0.2, 0.1]])  # int4 absmax: s = 0.1 (fp32 scale), codes 7, −2, 1
    out = fake_quant(w, 4, None, scale_dtype=torch.float32)
    torch.testing.assert_close(out, torch.tensor([[0.7, -0.2, 0.1]]))
    w = torch.tensor([[0.7, -0.26, 0.04]])  # → 0.7, −0.3, 0.0
    torch.testing.assert_close(fake_quant(w, 4, None, torch.float32), torch.tensor([[0.7, -0.3, 0.0]]))


def test_fake_quant_gradient_is_the_upstream_gradient():
    torch.manual_seed(0)
    w = (torch.randn(8, 12) * 0.1).requires_grad_(True)
    upstream = torch.randn(8, 12)
    (fake_quant(w, 6, 12.85) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)


def test_enable_qat_linear_forward_and_ste_gradient():
    torch.manual_seed(1)
    lin = nn.Linear(12, 5)
    x = torch.randn(3, 12)
    wq = fake_quant(lin.weight.detach(), 6, 12.85).clone().requires_grad_(True)
    ref = F.linear(x, wq, lin.bias.detach())
    names = enable_qat(lin, 6, 12.85)
    assert names == ["weight"]
    out = lin(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    up = torch.randn_like(out)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(lin.weight.grad, wq.grad)  # gradient taken at the quantized point


def test_patterns_state_dict_names_optimizer_and_disable():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    keys = list(model.state_dict())
    x = torch.randn(4, 6)
    plain = model(x).detach()
    assert enable_qat(model, 4, None, patterns=["2.*"]) == ["2.weight"]
    assert qat_modules(model) == ["2.weight"]
    assert list(model.state_dict()) == keys  # names unchanged: checkpoints and EMA keep working
    quantized = model(x).detach()
    assert not torch.allclose(quantized, plain)
    # the optimizer still updates the fp weights
    before = model[2].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(model[2].weight, before)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    assert disable_qat(model) == ["2.weight"] and qat_modules(model) == []
    torch.testing.assert_close(model(x), F.linear(torch.relu(model[0](x)), model[2].weight))


def test_errors():
    lin = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        enable_qat(lin, 6, patterns=["blocks.*"])
    with pytest.raises(QuantError, match="bits"):
        enable_qat(lin, 9)
    with pytest.raises(ConfigError, match="k"):
        fake_quant(torch.ones(2, 2), 6, k=-1.0)
    with pytest.raises(QuantError, match="1-D or 2-D"):
        fake_quant(torch.ones(2, 2, 2), 6)
    enable_qat(lin, 6)
    with pytest.raises(ConfigError, match="already"):
        enable_qat(lin, 6)

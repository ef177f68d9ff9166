"""The optimizer partition: AdamW fused as in the record, checked against AdamW by hand."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qlab.train.config import TrainConfig
from qlab.train.optim import build_optimizers, fused_adamw_supported


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(6, 4)
        self.gain = nn.Parameter(torch.ones(4))

    def param_groups(self):
        return {
            "matrix": [],
            "embed": [("tok_emb.weight", self.tok_emb.weight)],
            "scalar": [("gain", self.gain)],
        }


def _adamw_ref(p, grads, lr, b1, b2, eps, wd):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def test_adamw_groups_are_fused_on_cpu_and_match_the_formula():
    torch.manual_seed(0)
    model = _Toy()
    cfg = TrainConfig()
    opts = build_optimizers(model, cfg)
    assert fused_adamw_supported([model.gain])
    for opt in opts:
        assert opt.defaults["fused"] is True
    w0 = model.tok_emb.weight.detach().double().numpy().copy()
    grads = [torch.randn(6, 4) for _ in range(3)]
    for g in grads:
        model.tok_emb.weight.grad = g.clone()
        model.gain.grad = torch.zeros(4)
        opts.step()
    want = _adamw_ref(
        w0,
        [g.double().numpy() for g in grads],
        cfg.embed_lr,
        cfg.beta1,
        cfg.beta2,
        cfg.adam_eps,
        cfg.embed_wd,
    )
    np.testing.assert_allclose(model.tok_emb.weight.detach().double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_fused_falls_back_for_integer_or_meta_tensors():
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_adamw_supported([torch.empty(2, device="meta")])

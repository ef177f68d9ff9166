"""Muon: Newton–Schulz-5 against an SVD reference, MuonEq-R, and steps checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlab.errors import ConfigError, NumericalError
from qlab.train.muon import Muon, row_normalize, zeropower_ns5


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (40, 40), (8, 200)])
def test_ns5_matches_svd_polar_factor(shape):
    # Known spectrum spanning 50x (a Gaussian square matrix has near-zero singular values,
    # which 5 steps cannot lift; Muon does not need them to).
    g = torch.Generator().manual_seed(sum(shape))
    k = min(shape)
    Uq, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
    Vq, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
    G = Uq @ torch.diag(torch.logspace(-1.7, 0, k)) @ Vq.T
    O = zeropower_ns5(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    sv = torch.linalg.svdvals(O)
    # The tuned quintic does not converge to 1; it lands every singular value in a band.
    assert sv.min() > 0.6 and sv.max() < 1.2, (sv.min(), sv.max())
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = (U @ Vh).float()
    cosine = (O * polar).sum() / (O.norm() * polar.norm())
    assert cosine > 0.97
    # Same singular vectors: U^T O V is close to diagonal.
    core = U.float().T @ O @ Vh.float().T
    off = core - torch.diag(torch.diagonal(core))
    assert off.norm() < 0.05 * core.norm()


def test_ns5_scale_invariant_and_rejects_non_matrix():
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(zeropower_ns5(G), zeropower_ns5(1000.0 * G), rtol=1e-4, atol=1e-5)
    with pytest.raises(NumericalError, match="2-D"):
        zeropower_ns5(torch.randn(2, 3, 4))


def test_row_normalize_unit_rows_and_zero_row():
    U = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    R = row_normalize(U)
    torch.testing.assert_close(R, torch.tensor([[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]]))


# ---- an independent float64 implementation of one Muon step, written from the formulas ----


def _ns5_ref(M: np.ndarray, steps: int = 5) -> np.ndarray:
    a, b, c = 3.4445, -4.7750, 2.0315
    X = M / (np.linalg.norm(M) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def _muon_ref(p, grads, lr, mom, wd, row_norm):
    buf = np.zeros_like(p)
    for G in grads:
        buf = mom * buf + G
        upd = G + mom * buf  # Nesterov
        if row_norm:
            upd = upd / np.linalg.norm(upd, axis=1, keepdims=True)
        upd = _ns5_ref(upd) * np.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p = p * (1 - lr * wd) - lr * upd
    return p


@pytest.mark.parametrize("row_norm", [True, False])
@pytest.mark.parametrize("shape", [(3, 2), (2, 5)])
def test_two_steps_match_independent_reference(row_norm, shape):
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(2)]
    param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = Muon([param], lr=0.05, momentum=0.9, weight_decay=0.1, row_normalize=row_norm)
    for G in grads:
        param.grad = torch.tensor(G, dtype=torch.float32)
        opt.step()
    expected = _muon_ref(p0, grads, lr=0.05, mom=0.9, wd=0.1, row_norm=row_norm)
    np.testing.assert_allclose(param.detach().numpy(), expected, atol=2e-5, rtol=1e-4)


def test_row_normalisation_changes_the_update():
    # A gradient with one dominant row: without MuonEq-R the small rows barely move.
    G = torch.tensor([[100.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    moves = {}
    for flag in (True, False):
        p = torch.nn.Parameter(torch.zeros(2, 3))
        opt = Muon([p], lr=1.0, momentum=0.0, row_normalize=flag)
        p.grad = G.clone()
        opt.step()
        moves[flag] = p.detach().norm(dim=1)
    assert moves[True][1] > moves[False][1]


def test_rejects_vectors_and_bad_hyperparameters():
    with pytest.raises(ConfigError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ConfigError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], momentum=1.5)


def test_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    grads = [torch.randn(4, 6) for _ in range(3)]

    def run(split: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(4, 6))
        opt = Muon([p], lr=0.02, momentum=0.95, weight_decay=0.05)
        for i, g in enumerate(grads):
            if split and i == 2:
                state = opt.state_dict()
                p2 = torch.nn.Parameter(p.detach().clone())
                opt = Muon([p2], lr=0.02, momentum=0.95, weight_decay=0.05)
                opt.load_state_dict(state)
                p = p2
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(False), run(True))


def _ns5_bf16_record_grouping(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """NS5 written out step by step in bf16, each product grouped as the record's
    ``b * A + c * A @ A`` parses in Python: ``(c * A) @ A``."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16)
    X = X / (X.norm() + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = torch.mm(X, X.T)
        cA = torch.mul(A, c)
        B = torch.add(torch.mul(A, b), torch.mm(cA, A))
        X = torch.add(torch.mul(X, a), torch.mm(B, X))
    return (X.T if tall else X).float()


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_ns5_bf16_uses_the_records_operator_grouping(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    ours = zeropower_ns5(G, dtype=torch.bfloat16)
    assert torch.equal(ours, _ns5_bf16_record_grouping(G))
    # The other grouping, c * (A @ A), is a different bf16 computation: it must not match,
    # or this test could not tell the two apart.
    X = G.to(torch.bfloat16)
    X = X / (X.norm() + 1e-7)
    if X.shape[0] > X.shape[1]:
        X = X.T
    A = X @ X.T
    assert not torch.equal(2.0315 * (A @ A), (2.0315 * A) @ A)

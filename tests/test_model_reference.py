"""GPT forward checked against an independent, slow re-implementation from the formulas.

The reference below works head by head with explicit masks, applies RoPE as complex
rotation, XSA as an explicit projection and the U-Net skips as written in PAPERS.md §1,
reading parameters by name. It shares no code with ``qlab.model``.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlab.config import get_preset
from qlab.model import GPT

# Virtual layer orders for the tiny preset (4 layers, loop (1, 2) three times), by hand.
TINY_ORDERS = {False: ([0, 1], [2, 3]), True: ([0, 1, 2, 1], [2, 1, 2, 3])}


def randomize(model: GPT, seed: int = 0) -> GPT:
    """Replace every parameter with random values so no block is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 2 and min(p.shape) > 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.add_(0.3 * noise)
    return model


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def rope_complex(x, rope_dims, base):
    """x (T, D): rotate pairs (i, i + r/2) by −θ = −p·base^(−2i/r) via complex numbers."""
    t, _ = x.shape
    half = rope_dims // 2
    theta = torch.arange(t, dtype=torch.float64)[:, None] * base ** (-2 * torch.arange(half) / rope_dims)
    z = torch.complex(x[:, :half].double(), x[:, half:rope_dims].double()) * torch.polar(
        torch.ones_like(theta), -theta
    )
    return torch.cat((z.real.float(), z.imag.float(), x[:, rope_dims:]), dim=1)


def ref_attention(P, pre, i, x, cfg, idx):
    B, T, d = x.shape
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = (x @ P[f"{pre}.attn.c_q.weight"].T).view(B, T, H, D)
    k = (x @ P[f"{pre}.attn.c_k.weight"].T).view(B, T, Hkv, D)
    v = x @ P[f"{pre}.attn.c_v.weight"].T
    if f"value_embeds.{i}.weight" in P:
        v = v + P[f"value_embeds.{i}.weight"][idx]
    v = v.view(B, T, Hkv, D)
    out = torch.zeros(B, T, H, D)
    allowed = torch.tensor(
        [
            [t <= s and (cfg.attn_window is None or s - t < cfg.attn_window) for t in range(T)]
            for s in range(T)
        ]
    )
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            qh = rope_complex(rms(q[b, :, h]), cfg.rope_dim, cfg.rope_base) * P[f"{pre}.attn.q_gain"][h]
            kh = rope_complex(rms(k[b, :, kv]), cfg.rope_dim, cfg.rope_base)
            scores = qh @ kh.T / math.sqrt(D)
            scores = scores.masked_fill(~allowed, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v[b, :, kv]
            if cfg.xsa:
                vhat = v[b, :, kv] / v[b, :, kv].norm(dim=-1, keepdim=True)
                y = y - (y * vhat).sum(-1, keepdim=True) * vhat
            out[b, :, h] = y
    return out.reshape(B, T, d) @ P[f"{pre}.attn.proj.weight"].T


def ref_block(P, i, x, x0, cfg, idx):
    pre = f"blocks.{i}"
    mix = P[f"{pre}.resid_mix"]
    x = mix[0] * x + mix[1] * x0
    s = 1 / math.sqrt(i + 1) if cfg.ln_scale else 1.0
    x = x + P[f"{pre}.attn_scale"] * ref_attention(P, pre, i, rms(x) * s, cfg, idx)
    h = (rms(x) * s) @ P[f"{pre}.mlp.fc.weight"].T
    h = torch.where(h > 0, h, cfg.leaky_slope * h) if cfg.activation == "leaky_relu2" else h.clamp_min(0)
    return x + P[f"{pre}.mlp_scale"] * (h.square() @ P[f"{pre}.mlp.proj.weight"].T)


def ref_bigram(P, idx, buckets):
    B, T = idx.shape
    ids = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            cur, prev = int(idx[b, t]), int(idx[b, t - 1])
            ids[b, t] = buckets - 1 if t == 0 else ((36313 * cur) ^ (27191 * prev)) % (buckets - 1)
    return P["bigram.embed.weight"][ids] @ P["bigram.proj.weight"].T


def ref_logits(model, idx, orders):
    cfg = model.config
    P = {n: p.detach() for n, p in model.named_parameters()}
    x = P["tok_emb.weight"][idx]
    if cfg.bigram_buckets:
        x = x + ref_bigram(P, idx, cfg.bigram_buckets)
    x = x0 = rms(x)
    enc, dec = orders
    stack = []
    for i in enc:
        x = ref_block(P, i, x, x0, cfg, idx)
        stack.append(x)
    for j, i in enumerate(dec):
        if j < min(len(enc), len(dec)):
            skip = P["skip_weights"][j] * stack.pop()
            if cfg.skip_gates:
                x = skip + torch.sigmoid(P["skip_gates"][j]) * (x - skip)
            else:
                x = x + skip
        x = ref_block(P, i, x, x0, cfg, idx)
    head = P["tok_emb.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    z = rms(x) @ head.T
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


VARIANTS = {
    "tiny": {},
    "tiny+extras": {"bigram_buckets": 61, "bigram_dim": 16, "value_embed_layers": (0, 2), "attn_window": 5},
    "baseline-style": {
        "activation": "relu2",
        "rope_dims": None,
        "xsa": False,
        "skip_gates": False,
        "ln_scale": False,
        "q_gain_init": 1.5,
        "tie_embeddings": False,
    },
}


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_reference(variant, looping):
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(num_heads=2, num_kv_heads=1, model_dim=64, **VARIANTS[variant])
    model = randomize(GPT(cfg), seed=1)
    model.set_looping(looping)
    assert model.layer_order() == TINY_ORDERS[looping]
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        got = model(idx)
    want = ref_logits(model, idx, TINY_ORDERS[looping])
    assert got.dtype == torch.float32
    assert got.abs().max() > 1.0  # the check is not trivially comparing near-zeros
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)

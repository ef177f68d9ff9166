"""Causal self-attention of the reference GPT: GQA, QK RMSNorm, partial RoPE, q_gain, XSA.

The pieces that carry formulas (RoPE tables, the rotation, XSA, the sliding-window
mask) are plain functions so they can be tested directly and reused by analyses.
Tensors inside attention use SDPA's layout (B, heads, T, head_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlab.config import ModelConfig


def rope_tables(
    seq_len: int,
    rope_dims: int,
    base: float,
    *,
    train_seq_len: int | None = None,
    device: torch.device | str | None = None,
    record_bf16: bool = False,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (seq_len, rope_dims // 2), float32.

    ``record_bf16`` builds them as PR #1394 ran: up to ``train_seq_len`` its inverse
    frequencies live in a bf16 buffer and the positions are a bf16 ``arange`` (only 641 of
    2,048 positions are distinct in bf16), so cos/sin are bf16; longer sequences take the
    fp32 NTK path there too.

    Frequencies are base^(-2i/rope_dims). When ``train_seq_len`` is given and the
    sequence is longer, the base is stretched NTK-style, base·(T/T_train)^(r/(r−2)), so
    the slowest frequency still spans the longer context (as Parameter Golf's records do).
    """
    if train_seq_len is not None and seq_len > train_seq_len and rope_dims > 2:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
    elif record_bf16:
        exponents = torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims
        inv_freq = (1.0 / (base**exponents)).to(torch.bfloat16)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.bfloat16, device=device), inv_freq)
        return angles.cos(), angles.sin()
    exponents = torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims
    inv_freq = 1.0 / (base**exponents)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2·cos.shape[-1] dims of each head of ``x`` (..., T, head_dim).

    Rotated dims are split in halves (x1, x2) → (x1·cos + x2·sin, −x1·sin + x2·cos);
    the remaining dims pass through unchanged (partial RoPE).
    """
    half = cos.shape[-1]
    rope_dims = 2 * half
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    x1 = x[..., :half]
    x2 = x[..., half:rope_dims]
    rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    if rope_dims == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rope_dims:]), dim=-1)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """Remove from each head's output its component along that head's normalised V.

    ``y`` is (B, H, T, D), ``v`` is (B, H_kv, T, D); query head h reads KV head
    h // (H / H_kv), the same grouping as ``repeat_interleave`` for GQA. Per position t:
    y ← y − (y·v̂) v̂ with v̂ = v / ‖v‖.
    """
    b, h, t, d = y.shape
    h_kv = v.shape[1]
    y_g = y.reshape(b, h_kv, h // h_kv, t, d)
    v_hat = F.normalize(v, dim=-1).unsqueeze(2)
    along = (y_g * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return (y_g - along).reshape(b, h, t, d)


def sliding_window_mask(seq_len: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: i − window < j ≤ i."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


class CausalSelfAttention(nn.Module):
    """Grouped-query causal attention with the record-stack extras.

    q and k are RMS-normalised per head, rotated (partial RoPE), and q is scaled by a
    learned per-head gain ``q_gain``. The output projection is zero-initialised by the
    model's init (see ``GPT``).
    """

    def __init__(self, config: ModelConfig, use_xsa: bool | None = None) -> None:
        super().__init__()
        d, kv_dim = config.model_dim, config.kv_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.use_xsa = config.xsa if use_xsa is None else use_xsa
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv_dim, bias=False)
        self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), float(config.q_gain_init)))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        value_embed: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, d) → (B, T, d). ``attn_mask`` (T, T) bool replaces the causal mask;
        ``value_embed`` (B, T, kv_dim) is added to V before it is split into heads."""
        b, t, d = x.shape
        q = self.c_q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if value_embed is not None:
            v = v + value_embed.to(v.dtype)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(F.rms_norm(q, (self.head_dim,)), cos, sin)
        k = apply_rope(F.rms_norm(k, (self.head_dim,)), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        group = self.num_heads // self.num_kv_heads
        k_all = k.repeat_interleave(group, dim=1) if group > 1 else k
        v_all = v.repeat_interleave(group, dim=1) if group > 1 else v
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask)
        if self.use_xsa:
            y = xsa(y, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

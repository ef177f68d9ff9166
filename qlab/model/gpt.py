"""The reference GPT: one configurable model for the Parameter Golf baseline and record.

Forward pass (PAPERS.md §1): x0 = RMSNorm(tok_emb(idx) [+ bigram]); each block mixes
x ← m0·x + m1·x0, adds attn_scale·attn(norm(x)·s) and mlp_scale·mlp(norm(x)·s) with
s = 1/√(layer+1) when ``ln_scale``; encoder outputs are pushed on a stack and popped
(U-Net) into decoder inputs, either added with ``skip_weights`` or, with gates,
x ← lerp(w·skip, x, σ(gate)); the final RMSNorm feeds the (tied) head and a softcap
c·tanh(z/c). With depth recurrence switched on the loop segment runs ``loop_repeats``
times and the virtual layer list is split in half into encoder and decoder.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlab.config import ModelConfig, estimated_parameters
from qlab.errors import ConfigError, DataError
from qlab.io.memory import require_memory
from qlab.model.attention import CausalSelfAttention, rope_tables, sliding_window_mask
from qlab.model.embeddings import BigramHash

REDUCTIONS = ("mean", "none")
# Block tensors that are 2-D but act as per-channel controls, not matrices (→ AdamW scalars).
CONTROL_NAMES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates")


class MLP(nn.Module):
    """fc → relu² or LeakyReLU(slope)² → proj (proj zero-initialised by the model)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.model_dim, config.mlp_hidden, bias=False)
        self.proj = nn.Linear(config.mlp_hidden, config.model_dim, bias=False)
        self.leaky = config.activation == "leaky_relu2"
        self.slope = config.leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.leaky else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    """One transformer block with residual mixing and per-channel output scales."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.model_dim
        self.attn = CausalSelfAttention(config, use_xsa=config.uses_xsa(layer_idx))
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        # A constant, not a parameter: damps deeper blocks' normalised inputs.
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1) if config.ln_scale else 1.0

    def forward(
        self,
        x: Tensor,
        x0: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        value_embed: Tensor | None = None,
    ) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        d = x.shape[-1]
        a = self.attn(F.rms_norm(x, (d,)) * self.ln_scale, cos, sin, attn_mask, value_embed)
        x = x + self.attn_scale.to(x.dtype) * a
        m = self.mlp(F.rms_norm(x, (d,)) * self.ln_scale)
        return x + self.mlp_scale.to(x.dtype) * m


def plain_order(num_layers: int) -> tuple[list[int], list[int]]:
    """Encoder/decoder split without recurrence: first n//2 layers, then the rest."""
    n_enc = num_layers // 2
    return list(range(n_enc)), list(range(n_enc, num_layers))


def looped_order(num_layers: int, loop_layers: tuple[int, ...], repeats: int) -> tuple[list[int], list[int]]:
    """Virtual layer list with the loop segment run ``repeats`` times, split in half."""
    seq = list(range(loop_layers[0])) + list(loop_layers) * repeats
    seq += list(range(loop_layers[-1] + 1, num_layers))
    n_enc = len(seq) // 2
    return seq[:n_enc], seq[n_enc:]


class GPT(nn.Module):
    """Configurable GPT reproducing the Parameter Golf baseline and record stack."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"GPT needs a ModelConfig, got {type(config).__name__}")
        # float32 weights and torch's initialisation copy, checked before the first allocation
        require_memory(
            8 * estimated_parameters(config), f"a {estimated_parameters(config):,}-parameter model"
        )
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.model_dim)
        self.bigram = BigramHash(c.bigram_buckets, c.bigram_dim, c.model_dim) if c.bigram_buckets else None
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(c.vocab_size, c.kv_dim) for i in c.value_embed_layers}
        )
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self._orders = {False: plain_order(c.num_layers)}
        if c.loop_layers is not None:
            self._orders[True] = looped_order(c.num_layers, c.loop_layers, c.loop_repeats)
        n_skip = max(min(len(enc), len(dec)) for enc, dec in self._orders.values())
        self.skip_weights = nn.Parameter(torch.ones(n_skip, c.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, c.model_dim)) if c.skip_gates else None
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.model_dim, c.vocab_size, bias=False)
        self._looping = False
        self._init_weights()
        if c.precision == "record":  # the record's .bfloat16() leaves only tok_emb in bf16
            self.tok_emb.to(torch.bfloat16)

    # ---- initialisation ------------------------------------------------------------
    def _zero_init_linears(self) -> list[nn.Linear]:
        blocks = [b for b in self.blocks if isinstance(b, Block)]  # narrows ModuleList items
        zero: list[nn.Linear] = [b.attn.proj for b in blocks] + [b.mlp.proj for b in blocks]
        if self.bigram is not None:
            zero.append(self.bigram.proj)
        if self.lm_head is not None:
            zero.append(self.lm_head)
        return zero

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Embeddings N(0, std); output projections zero; other linears ≥64×64 orthogonal.

        Without ``orthogonal_init`` the remaining linears keep PyTorch's default init,
        as the naive baseline does. Meta tensors (parameter counting) are left alone.
        """
        std = self.config.embed_init_std
        zero = {id(m) for m in self._zero_init_linears()}
        for module in self.modules():
            if isinstance(module, nn.Embedding) and not module.weight.is_meta:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Linear) and not module.weight.is_meta:
                if id(module) in zero:
                    nn.init.zeros_(module.weight)
                elif self.config.orthogonal_init and min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, gain=1.0)

    # ---- depth recurrence ----------------------------------------------------------
    @property
    def looping(self) -> bool:
        """Whether the loop segment currently runs ``loop_repeats`` times."""
        return self._looping

    def set_looping(self, enabled: bool) -> None:
        """Switch depth recurrence on or off (ConfigError if the config has no loop)."""
        if enabled and True not in self._orders:
            raise ConfigError("set_looping(True): this ModelConfig has loop_layers=None")
        self._looping = bool(enabled)

    def layer_order(self) -> tuple[list[int], list[int]]:
        """(encoder, decoder) physical block indices executed in the current mode."""
        enc, dec = self._orders[self._looping]
        return list(enc), list(dec)

    @property
    def num_skips(self) -> int:
        """U-Net skip connections used in the current mode (≤ rows of ``skip_weights``)."""
        enc, dec = self._orders[self._looping]
        return min(len(enc), len(dec))

    # ---- forward pieces ------------------------------------------------------------
    def _check_idx(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
            raise DataError(f"GPT input idx must be an integer tensor of shape (B, T), got {got}")
        if idx.shape[1] == 0:
            raise DataError("GPT input idx has zero length (T = 0)")
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise DataError(
                    f"GPT input token ids must lie in [0, {self.config.vocab_size}), got range [{lo}, {hi}]"
                )

    def _trunk(self, idx: Tensor, collect: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Run embedding and all executed blocks; return the residual stream (pre final
        norm) and, if ``collect``, the stream after every executed block."""
        self._check_idx(idx)
        c = self.config
        t = idx.shape[1]
        x = self.tok_emb(idx).float()  # a bf16 table (precision "record") still feeds fp32 blocks
        if self.bigram is not None:
            x = x + self.bigram(idx)
        x = F.rms_norm(x, (c.model_dim,))
        x0 = x
        train_len = c.train_seq_len if c.rope_ntk else None
        cos, sin = rope_tables(
            t, c.rope_dim, c.rope_base, train_seq_len=train_len, device=idx.device,
            record_bf16=c.precision == "record",
        )  # fmt: skip
        mask = sliding_window_mask(t, c.attn_window, idx.device) if c.attn_window is not None else None
        encoder, decoder = self._orders[self._looping]
        n_skip = min(len(encoder), len(decoder))
        outputs: list[Tensor] = []
        skips: list[Tensor] = []
        for i in encoder:
            x = self._run_block(i, x, x0, idx, cos, sin, mask)
            skips.append(x)
            if collect:
                outputs.append(x)
        for j, i in enumerate(decoder):
            if j < n_skip:
                x = self._merge_skip(j, x, skips.pop())
            x = self._run_block(i, x, x0, idx, cos, sin, mask)
            if collect:
                outputs.append(x)
        return x, outputs

    def _run_block(self, i: int, x: Tensor, x0: Tensor, idx: Tensor, cos, sin, mask) -> Tensor:
        key = str(i)
        ve = self.value_embeds[key](idx) if key in self.value_embeds else None
        return self.blocks[i](x, x0, cos, sin, mask, ve)

    def _merge_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    # ---- public API ----------------------------------------------------------------
    def final_hidden(self, idx: Tensor) -> Tensor:
        """(B, T, d) output of the final RMSNorm — the LM head's input."""
        x, _ = self._trunk(idx)
        return F.rms_norm(x, (self.config.model_dim,))

    def block_outputs(self, idx: Tensor) -> list[Tensor]:
        """Residual stream after each executed block (virtual layer), in execution order."""
        return self._trunk(idx, collect=True)[1]

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        """Head + softcap on an already-normed hidden state; float32 (…, V)."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(h, weight.to(h.dtype)).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(z / cap)

    def norm_and_logits(self, x: Tensor) -> Tensor:
        """Final norm, head and softcap on a raw residual stream (logit lens)."""
        return self.logits_from_hidden(F.rms_norm(x, (self.config.model_dim,)))

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Logits (B, T, V) float32 when ``targets`` is None, else float32 cross-entropy:
        a scalar for ``reduction="mean"`` or per-token NLL (B, T) for ``"none"``."""
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        logits = self.logits_from_hidden(self.final_hidden(idx))
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise DataError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Optimizer partition: "matrix" (2-D linear weights → Muon), "embed" (embedding
        tables and untied head → AdamW), "scalar" (gains, scales, mixes, skips → AdamW)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "embed": [], "scalar": []}
        for name, p in self.named_parameters():
            groups[parameter_group(name, p.dim())].append((name, p))
        return groups

    def num_parameters(self) -> int:
        """Number of unique parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())


def parameter_group(name: str, ndim: int) -> str:
    """Optimizer group of a parameter by name: "embed", "matrix" or "scalar"."""
    if name.startswith(("tok_emb.", "value_embeds.", "lm_head.", "bigram.embed.")):
        return "embed"
    if ndim == 2 and not any(c in name for c in CONTROL_NAMES):
        return "matrix"
    return "scalar"


def parameter_family(name: str) -> str:
    """Reporting family of a parameter: embedding, attention, mlp or control."""
    if name.startswith(("tok_emb.", "value_embeds.", "lm_head.", "bigram.")):
        return "embedding"
    if any(c in name for c in ("attn_scale", "mlp_scale", "resid_mix", "skip_weights", "skip_gates")):
        return "control"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise ConfigError(f"parameter {name!r} belongs to no known family")


def parameter_table(model: GPT) -> pd.DataFrame:
    """One row per parameter tensor: name, shape, numel, family, group."""
    rows = [
        {
            "name": name,
            "shape": tuple(p.shape),
            "numel": p.numel(),
            "family": parameter_family(name),
            "group": parameter_group(name, p.dim()),
        }
        for name, p in model.named_parameters()
    ]
    return pd.DataFrame(rows, columns=["name", "shape", "numel", "family", "group"])

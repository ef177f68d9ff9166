"""Score-first test-time training (TTT) and the pre-quantization TTT stage.

**Score-first TTT** (PAPERS.md §4, the legal protocol): the validation targets are cut
into chunks of ``chunk_tokens``; each chunk is first *scored* with no gradients, then the
model *adapts* on it (SGD momentum 0.9, lr 0.005 with cosine decay over chunks, 3 epochs,
32 sequences per step, gradient clip 1.0, optionally the first N blocks frozen). A token
is never scored after the model has trained on it. Details:

- Scoring uses exactly the windows of :func:`qlab.eval.bpb.evaluate_bpb` (standard, or
  sliding with ``stride``) and the same per-window scoring code, so with lr = 0 the result
  equals plain evaluation. A window belongs to the chunk holding its first scored target,
  so a chunk is a run of whole windows: its size differs from ``chunk_tokens`` by less
  than one window.
- Training on chunk c uses sequences of seq_len targets covering the chunk's scored
  targets [lo, hi]; the last sequence is shifted back to end at hi (its extra targets
  were scored in earlier chunks). The last chunk is scored but not trained on: no later
  token could benefit.
- Legality is enforced as the run goes and recorded in a ledger (one row per score or
  train event with its target range and the model version = optimizer steps so far):
  every scored range must lie beyond every trained target, and every trained target must
  already have been scored. :func:`check_legality` re-checks a ledger independently.
- Optional per-tensor gradient scaling (PR #639's "SNR²"): for each trainable tensor,
  SNR = |mean(g)| / std(g) over the elements of its gradient in the current step
  (qlab's definition; PR #639 does not spell its own out), and the gradient is
  multiplied by (SNR / max SNR)^p, p = 1 ("snr") or 2 ("snr2"), before clipping.
- TTT adapts a deep copy; the caller's model is never modified.
- Single-process: the whole validation stream is evaluated in the calling process with
  no all-reduce (score-first TTT is sequential by nature). Under torchrun call it on one
  rank, or accept that every rank computes the same result.

**PreQuantTTT** (:func:`prequant_ttt`, PR #2011's stage, from PR #1364): adapt the
full-precision model on tokens *before* quantizing it and return the adapted copy. When
those tokens are the validation set this is *not* score-first legal: every validation
token is trained on before it is scored (Parameter Golf's organisers ruled pre-quant TTT
on validation data out). It is here to reproduce PR #2011's pipeline attribution.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlab.data.tokenizer import ByteTables
from qlab.errors import ConfigError, DataError, NumericalError, QlabError
from qlab.eval.bpb import (
    Window,
    autocast_context,
    score_windows,
    sliding_windows,
    standard_windows,
    truncate_tokens,
)

OPTIMIZERS = ("sgd", "adamw")
GRAD_SCALINGS = (None, "snr", "snr2")


@dataclass
class TTTConfig:
    """Knobs of score-first TTT; defaults are the record's legal TTT (PAPERS.md §4)."""

    seq_len: int = 2048
    chunk_tokens: int = 32_768
    stride: int | None = None  # scoring windows: None = standard, else sliding with this stride
    score_batch_seqs: int = 32
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw"
    lr: float = 0.005
    momentum: float = 0.9  # SGD momentum, or AdamW beta1
    beta2: float = 0.95
    weight_decay: float = 0.0
    epochs: int = 3
    batch_seqs: int = 32
    grad_clip: float = 1.0  # 0 = off
    freeze_blocks: int = 0  # freeze model.blocks[:N]
    grad_scaling: str | None = None  # None, "snr" or "snr2"
    cosine: bool = True  # lr·½(1 + cos(π·c/(C−1))) over chunks c; False = constant
    max_tokens: int | None = None
    autocast: str | None = None  # "bf16" or None

    def __post_init__(self) -> None:
        _validate(self)

    def as_dict(self) -> dict:
        return asdict(self)


def _validate(c: TTTConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"TTTConfig: {msg}")

    def pos_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for name in ("seq_len", "chunk_tokens", "score_batch_seqs", "epochs", "batch_seqs"):
        need(pos_int(getattr(c, name)), f"{name} must be a positive integer, got {getattr(c, name)!r}")
    need(
        c.stride is None or pos_int(c.stride), f"stride must be None or a positive integer, got {c.stride!r}"
    )
    need(
        c.max_tokens is None or pos_int(c.max_tokens),
        f"max_tokens must be None or positive, got {c.max_tokens!r}",
    )
    need(c.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
    need(
        c.grad_scaling in GRAD_SCALINGS,
        f"grad_scaling must be one of {GRAD_SCALINGS}, got {c.grad_scaling!r}",
    )
    need(c.autocast in (None, "bf16"), f"autocast must be None or 'bf16', got {c.autocast!r}")
    for name in ("lr", "weight_decay", "grad_clip"):
        v = getattr(c, name)
        need(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
            f"{name} must be finite and ≥ 0, got {v!r}",
        )
    for name in ("momentum", "beta2"):
        v = getattr(c, name)
        need(isinstance(v, (int, float)) and 0 <= v < 1, f"{name} must lie in [0, 1), got {v!r}")
    need(
        isinstance(c.freeze_blocks, int) and c.freeze_blocks >= 0,
        "freeze_blocks must be a non-negative integer",
    )


@dataclass
class TTTResult:
    """Outcome of :func:`score_first_ttt`.

    per_chunk: one row per chunk — chunk, first_target, last_target, tokens, bytes, loss
    (mean NLL, nats), chunk_bpb, running_bpb, lr, train_steps, version (optimizer steps
    taken before the chunk was scored). ledger: one row per event (see module doc).
    """

    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    per_chunk: pd.DataFrame
    ledger: pd.DataFrame
    config: TTTConfig
    model: nn.Module | None = field(default=None, repr=False)  # the adapted copy, if requested


# ---- pieces ---------------------------------------------------------------------------------


def _prepare(tokens: Tensor, cfg: TTTConfig) -> tuple[Tensor, list[Window]]:
    """Tokens and windows exactly as :func:`evaluate_bpb` builds them."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise DataError("TTT: validation tokens must be a 1-D integer tensor")
    tokens = tokens.to(torch.int64).cpu()
    if cfg.stride is None:
        tokens = truncate_tokens(tokens, cfg.seq_len, cfg.max_tokens)
        return tokens, standard_windows(tokens.numel(), cfg.seq_len)
    if cfg.max_tokens is not None:
        tokens = tokens[: cfg.max_tokens]
    if tokens.numel() < 2:
        raise DataError(f"TTT: {tokens.numel()} validation tokens; need at least 2")
    return tokens, sliding_windows(tokens.numel(), cfg.seq_len, cfg.stride)


def make_chunks(windows: list[Window], chunk_tokens: int) -> list[list[Window]]:
    """Group windows (in order) by the chunk ⌊(first scored target − 1)/chunk_tokens⌋ they start in."""
    chunks: list[list[Window]] = []
    current = None
    for w in windows:
        cid = (w.score_from - 1) // chunk_tokens
        if cid != current:
            chunks.append([])
            current = cid
        chunks[-1].append(w)
    return chunks


def chunk_train_sequences(tokens: Tensor, lo: int, hi: int, seq_len: int) -> tuple[Tensor, Tensor, int]:
    """(x, y, first target) of rows whose targets cover [lo, hi] (absolute indices, inclusive).

    Rows hold min(seq_len, hi) targets; the last row is shifted back to end at ``hi``, so
    the first target trained on may precede ``lo`` (it was scored in an earlier chunk).
    """
    length = min(seq_len, hi)
    firsts = list(range(lo, hi + 1, length))
    firsts[-1] = min(firsts[-1], hi - length + 1)
    x = torch.stack([tokens[a - 1 : a - 1 + length] for a in firsts])
    y = torch.stack([tokens[a : a + length] for a in firsts])
    return x, y, min(firsts)


def snr_scale_grads(params: list[nn.Parameter], power: int, eps: float = 1e-12) -> list[float]:
    """Multiply each gradient by (SNR/max SNR)^power, SNR = |mean(g)|/(std(g) + eps) over its
    elements (std unbiased).

    Tensors with fewer than 2 elements (no std) are left alone (scale 1), as is every
    tensor when all SNRs are 0. Returns the scales applied, in ``params`` order (1.0 for
    params without a gradient).
    """
    snrs: list[float | None] = []
    for p in params:
        g = p.grad
        if g is None or g.numel() < 2:
            snrs.append(None)
            continue
        g = g.float()
        snrs.append(abs(float(g.mean())) / (float(g.std()) + eps))
    top = max((s for s in snrs if s is not None), default=0.0)
    scales = []
    for p, s in zip(params, snrs):
        scale = 1.0 if s is None or top <= 0 else (s / top) ** power
        if scale != 1.0 and p.grad is not None:  # scale ≠ 1 only where a gradient was measured
            p.grad.mul_(scale)
        scales.append(scale)
    return scales


def _trainable_copy(model: nn.Module, freeze_blocks: int, device: torch.device) -> tuple[nn.Module, list]:
    work = copy.deepcopy(model).to(device)
    if freeze_blocks:
        blocks = getattr(work, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) < freeze_blocks:
            n = len(blocks) if isinstance(blocks, nn.ModuleList) else 0
            raise ConfigError(f"TTT: freeze_blocks={freeze_blocks} but the model has {n} blocks")
        for block in blocks[:freeze_blocks]:
            block.requires_grad_(False)
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("TTT: no trainable parameters left (all frozen)")
    return work, params


def _optimizer(params: list, cfg: TTTConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), weight_decay=cfg.weight_decay
    )


def _batches(x: Tensor, y: Tensor, batch_seqs: int, epochs: int) -> Iterator[tuple[Tensor, Tensor]]:
    for _ in range(epochs):
        for i in range(0, x.shape[0], batch_seqs):
            yield x[i : i + batch_seqs], y[i : i + batch_seqs]


def _train(work, params, opt, x, y, cfg: TTTConfig, lr: float, device, what: str) -> int:
    """Run ``epochs`` passes of optimizer steps over (x, y); returns the number of steps."""
    work.train()
    steps = 0
    for xb, yb in _batches(x, y, cfg.batch_seqs, cfg.epochs):
        with autocast_context(device, cfg.autocast):
            loss = work(xb.to(device), yb.to(device))
        if not torch.isfinite(loss):
            raise NumericalError(f"TTT: non-finite training loss on {what} (lr={lr:.3g}); lower the lr")
        loss.backward()
        if cfg.grad_scaling is not None:
            snr_scale_grads(params, 1 if cfg.grad_scaling == "snr" else 2)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    return steps


def chunk_lr(cfg: TTTConfig, chunk: int, n_chunks: int) -> float:
    """lr for chunk ``chunk``: cosine from lr (first chunk) to 0 (last chunk), or constant."""
    if not cfg.cosine or n_chunks < 2:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (n_chunks - 1)))


# ---- legality ----------------------------------------------------------------------------


class LegalityTracker:
    """Score-first bookkeeping: scored ranges must lie beyond every trained target, and
    trained targets must already have been scored. Violations raise QlabError."""

    def __init__(self) -> None:
        self.scored_hi = 0  # highest target index scored so far
        self.trained_hi = 0  # highest target index trained on so far

    def score(self, chunk: int, lo: int, hi: int) -> None:
        if lo <= self.trained_hi:
            raise QlabError(
                f"TTT legality violated: chunk {chunk} scores targets from {lo} "
                f"but the model already trained on targets up to {self.trained_hi}"
            )
        self.scored_hi = max(self.scored_hi, hi)

    def train(self, chunk: int, lo: int, hi: int) -> None:
        if hi > self.scored_hi:
            raise QlabError(
                f"TTT legality violated: chunk {chunk} trains on targets up to {hi} "
                f"but only targets up to {self.scored_hi} were scored"
            )
        self.trained_hi = max(self.trained_hi, hi)


def check_legality(ledger: pd.DataFrame) -> None:
    """Replay a TTT ledger (rows in event order) through :class:`LegalityTracker`."""
    tracker = LegalityTracker()
    for row in ledger.itertuples(index=False):
        step = tracker.score if row.event == "score" else tracker.train
        step(row.chunk, row.first_target, row.last_target)


# ---- score-first TTT ---------------------------------------------------------------------------


def score_first_ttt(
    model: nn.Module,
    val_tokens: Tensor,
    byte_tables: ByteTables,
    config: TTTConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_model: bool = False,
) -> TTTResult:
    """Score each validation chunk, then adapt a copy of ``model`` on it (see module doc).

    ``model(x, y, reduction="none")`` must give per-token NLL and ``model(x, y)`` the
    mean, as :class:`qlab.model.GPT` does.
    """
    cfg = config or TTTConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens, windows = _prepare(val_tokens, cfg)
    chunks = make_chunks(windows, cfg.chunk_tokens)
    tables = byte_tables.to(device)
    work, params = _trainable_copy(model, cfg.freeze_blocks, device)
    opt = _optimizer(params, cfg)
    ledger: list[dict] = []
    rows: list[dict] = []
    version = 0
    total = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    legal = LegalityTracker()
    for c, chunk in enumerate(tqdm(chunks, desc="ttt", disable=not progress, leave=False)):
        lo, hi = chunk[0].score_from, chunk[-1].end
        legal.score(c, lo, hi)
        scored_at = version
        ledger.append(
            {"event": "score", "chunk": c, "first_target": lo, "last_target": hi, "version": version}
        )
        sums = _score_chunk(work, tokens, chunk, tables, device, cfg)
        total += sums
        lr = chunk_lr(cfg, c, len(chunks))
        steps = 0
        if c < len(chunks) - 1:
            x, y, first = chunk_train_sequences(tokens, lo, hi, cfg.seq_len)
            legal.train(c, first, hi)
            ledger.append(
                {"event": "train", "chunk": c, "first_target": first, "last_target": hi, "version": version}
            )
            steps = _train(work, params, opt, x, y, cfg, lr, device, f"chunk {c}")
            version += steps
        rows.append(_chunk_row(c, lo, hi, sums, total, lr, steps, scored_at))
    ledger_df = pd.DataFrame(ledger, columns=["event", "chunk", "first_target", "last_target", "version"])
    check_legality(ledger_df)
    work.eval()
    nll, count, nbytes = total.tolist()
    return TTTResult(
        val_loss=nll / count,
        val_bpb=nll / math.log(2) / nbytes,
        tokens=int(count),
        bytes=int(nbytes),
        per_chunk=pd.DataFrame(rows),
        ledger=ledger_df,
        config=cfg,
        model=work if return_model else None,
    )


@torch.no_grad()
def _score_chunk(work, tokens, chunk: list[Window], tables, device, cfg: TTTConfig) -> Tensor:
    work.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i in range(0, len(chunk), cfg.score_batch_seqs):
        sums += score_windows(work, tokens, chunk[i : i + cfg.score_batch_seqs], tables, device, cfg.autocast)
    return sums


def _chunk_row(c, lo, hi, sums, total, lr, steps, version) -> dict:
    nll, count, nbytes = sums.tolist()
    t_nll, _, t_bytes = total.tolist()
    return {
        "chunk": c, "first_target": lo, "last_target": hi, "tokens": int(count), "bytes": int(nbytes),
        "loss": nll / count, "chunk_bpb": nll / math.log(2) / nbytes,
        "running_bpb": t_nll / math.log(2) / t_bytes, "lr": lr, "train_steps": steps, "version": version,
    }  # fmt: skip


# ---- PreQuantTTT ----------------------------------------------------------------------------


def prequant_ttt(
    model: nn.Module,
    train_or_val_tokens: Tensor,
    config: TTTConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> nn.Module:
    """PreQuantTTT (PR #2011's stage): adapt a copy of ``model`` before quantization; return it.

    The tokens are cut into non-overlapping windows of ``config.seq_len`` (at most
    ``config.max_tokens`` tokens) and trained on for ``config.epochs`` epochs at the
    constant ``config.lr`` with ``config.optimizer`` (default here: AdamW, lr 1e-4 — qlab's
    choice; the PRs do not publish theirs). **Legality caveat**: on validation tokens this
    trains on every token before it is scored, which the score-first rule forbids; numbers
    obtained that way are not comparable with legal submissions. Pass training tokens for
    a legal variant.
    """
    cfg = config or TTTConfig(optimizer="adamw", lr=1e-4, cosine=False)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t = train_or_val_tokens
    if not isinstance(t, Tensor) or t.dim() != 1 or t.is_floating_point():
        raise DataError("prequant_ttt: tokens must be a 1-D integer tensor")
    tokens = truncate_tokens(train_or_val_tokens.to(torch.int64).cpu(), cfg.seq_len, cfg.max_tokens)
    n = (tokens.numel() - 1) // cfg.seq_len
    x = tokens[: n * cfg.seq_len].view(n, cfg.seq_len)
    y = tokens[1 : n * cfg.seq_len + 1].view(n, cfg.seq_len)
    work, params = _trainable_copy(model, cfg.freeze_blocks, device)
    opt = _optimizer(params, cfg)
    for epoch in tqdm(range(cfg.epochs), desc="prequant-ttt", disable=not progress, leave=False):
        one = TTTConfig(**{**cfg.as_dict(), "epochs": 1})
        _train(work, params, opt, x, y, one, cfg.lr, device, f"epoch {epoch}")
    work.eval()
    return work

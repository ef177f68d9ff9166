"""Validation loss and bits per byte, the challenge's metric.

BPB = (Σ NLL / ln 2) / Σ bytes, where each target token y after token x is worth
base[y] + (has_leading_space[y] AND NOT is_boundary[x]) bytes (PAPERS.md §2). Sums are
accumulated in float64 and all-reduced across ranks, so a distributed evaluation gives
the same number as a single process.

Two window layouts:
- standard: non-overlapping windows of ``seq_len`` tokens, every target scored once;
- sliding (``stride``): windows start at 0, stride, 2·stride, …; the first window
  scores all its positions and each later window only the targets not yet scored (its
  last ≤ stride positions), so every target is scored exactly once with at least
  ``seq_len − stride`` tokens of context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from qlab.data.tokenizer import ByteTables, token_bytes
from qlab.errors import DataError
from qlab.model.modes import eval_mode


@dataclass
class EvalResult:
    val_loss: float  # mean negative log-likelihood per token, nats
    val_bpb: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """Inputs tokens[start:end], targets tokens[start+1:end+1]; targets from ``score_from`` on count."""

    start: int
    end: int
    score_from: int  # absolute index of the first scored target token


def standard_windows(num_tokens: int, seq_len: int) -> list[Window]:
    """Non-overlapping windows over ``num_tokens`` tokens (targets 1 … num_tokens−1)."""
    targets = num_tokens - 1
    return [Window(s, s + seq_len, s + 1) for s in range(0, targets - seq_len + 1, seq_len)]


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows of ``seq_len`` every ``stride`` tokens; each target scored by exactly one window."""
    if not 0 < stride <= seq_len:
        raise DataError(f"sliding-window stride must be in 1..seq_len={seq_len}, got {stride}")
    targets = num_tokens - 1
    windows, scored_to = [], 0  # targets with absolute index ≤ scored_to are done
    start = 0
    while scored_to < targets:
        end = min(start + seq_len, targets)
        windows.append(Window(start, end, scored_to + 1))
        scored_to = end
        start += stride
    return windows


def truncate_tokens(tokens: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Keep ⌊(N−1)/L⌋·L + 1 tokens (at most ``max_tokens``), as the challenge truncates validation."""
    n = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    usable = (n - 1) // seq_len * seq_len + 1
    if usable < seq_len + 1:
        if max_tokens is not None and max_tokens < tokens.numel():
            raise DataError(f"max_tokens={max_tokens} is less than one window of {seq_len}+1 tokens")
        raise DataError(f"validation set has {tokens.numel()} tokens: fewer than one window of {seq_len}+1")
    return tokens[:usable]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_autocast(autocast: str | None, device: torch.device) -> str | None:
    """qlab's one autocast rule: "bf16" always, "auto" on CUDA only, else none."""
    return "bf16" if autocast == "bf16" or (autocast == "auto" and device.type == "cuda") else None


def autocast_context(device: torch.device, autocast: str | None):
    """bf16 autocast under :func:`resolve_autocast`'s rule, else a no-op context."""
    if resolve_autocast(autocast, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    val_tokens: torch.Tensor,
    byte_tables: ByteTables,
    *,
    seq_len: int,
    batch_seqs: int = 8,
    stride: int | None = None,
    device: torch.device | str | None = None,
    max_tokens: int | None = None,
    autocast: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score ``val_tokens`` with ``model(x, y, reduction="none")`` and return loss and bpb.

    ``stride=None`` uses standard windows; otherwise the sliding window. Windows are
    dealt round-robin to ranks when torch.distributed is initialised.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens, windows = scored_windows(val_tokens, seq_len, stride, max_tokens)
    rank, world = _rank_world()
    mine = windows[rank::world]
    local_tables = tables_on(byte_tables, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes

    with eval_mode(model):
        batches = range(0, len(mine), batch_seqs)
        for i in tqdm(batches, desc="eval", disable=not progress or rank != 0, leave=False):
            sums += score_windows(model, tokens, mine[i : i + batch_seqs], local_tables, device, autocast)
    if world > 1:
        dist.all_reduce(sums)
    nll, count, nbytes = sums.tolist()
    return EvalResult(
        val_loss=nll / count, val_bpb=nll / math.log(2) / nbytes, tokens=int(count), bytes=int(nbytes)
    )


def scored_windows(
    val_tokens: torch.Tensor, seq_len: int, stride: int | None, max_tokens: int | None
) -> tuple[torch.Tensor, list[Window]]:
    """(int64 tokens, windows) every evaluation scores: standard windows over whole
    ``seq_len`` chunks, or sliding ones (``stride``) over the first ``max_tokens`` tokens."""
    tokens = val_tokens.to(torch.int64)
    if stride is None:
        tokens = truncate_tokens(tokens, seq_len, max_tokens)
        return tokens, standard_windows(tokens.numel(), seq_len)
    tokens = tokens[:max_tokens] if max_tokens is not None else tokens
    return tokens, sliding_windows(tokens.numel(), seq_len, stride)


def window_batch(
    tokens: torch.Tensor, windows: list[Window]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, scored mask) of a batch of windows, (B, T) each. Windows in one
    batch share a length except possibly the final, shorter sliding window: it is padded
    and the padding masked out of the score."""
    length = max(w.end - w.start for w in windows)
    x = torch.zeros(len(windows), length, dtype=torch.int64)
    y = torch.zeros_like(x)
    mask = torch.zeros(len(windows), length, dtype=torch.bool)
    for row, w in enumerate(windows):
        n = w.end - w.start
        x[row, :n] = tokens[w.start : w.end]
        y[row, :n] = tokens[w.start + 1 : w.end + 1]
        mask[row, w.score_from - w.start - 1 : n] = True
    return x, y, mask


class Batch(NamedTuple):
    """One batch of scored windows: where it starts among ``total`` windows, its windows,
    and inputs, targets and scored mask (B, T) on the evaluation device."""

    start: int
    total: int
    windows: list[Window]
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


def scored_batches(
    val_tokens: torch.Tensor,
    seq_len: int,
    batch_seqs: int,
    stride: int | None,
    max_tokens: int | None,
    device: torch.device,
) -> Iterator[Batch]:
    """The batches every per-token scorer walks (:func:`token_scores`, agreement)."""
    tokens, windows = scored_windows(val_tokens, seq_len, stride, max_tokens)
    for i in range(0, len(windows), batch_seqs):
        batch = windows[i : i + batch_seqs]
        x, y, mask = (t.to(device) for t in window_batch(tokens, batch))
        yield Batch(i, len(windows), batch, x, y, mask)


def target_positions(windows: list[Window], length: int) -> torch.Tensor:
    """(B, T) index in the token stream of each window position's target."""
    return torch.stack([torch.arange(w.start + 1, w.start + 1 + length) for w in windows])


def tables_on(tables: ByteTables, device: torch.device) -> ByteTables:
    return ByteTables(
        base_bytes=tables.base_bytes.to(device),
        has_leading_space=tables.has_leading_space.to(device),
        is_boundary=tables.is_boundary.to(device),
    )


def score_windows(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    windows: list[Window],
    tables: ByteTables,
    device: torch.device,
    autocast: str | None,
) -> torch.Tensor:
    """(Σ nll, scored tokens, Σ bytes) of a batch of windows (float64, on ``device``)."""
    nll, nbytes, mask = _window_scores(model, tokens, windows, tables, device, autocast)
    return torch.stack([(nll * mask).sum(), mask.sum().double(), (nbytes * mask).sum()])


def token_scores(
    model: torch.nn.Module,
    val_tokens: torch.Tensor,
    byte_tables: ByteTables,
    *,
    seq_len: int,
    batch_seqs: int = 8,
    stride: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scored token: (nll in nats, bytes, position of the target in ``val_tokens``),
    float64/float64/int64 on the CPU — the same tokens and values :func:`evaluate_bpb`
    sums with the same ``stride``, kept apart for paired comparisons."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tables = tables_on(byte_tables, device)
    out_nll, out_bytes, out_pos = [], [], []
    with eval_mode(model), torch.no_grad():
        for b in scored_batches(val_tokens, seq_len, batch_seqs, stride, max_tokens, device):
            keep = b.mask.cpu()
            out_nll.append(model(b.x, b.y, reduction="none").float().double().cpu()[keep])
            out_bytes.append(token_bytes(tables, b.x, b.y).double().cpu()[keep])
            out_pos.append(target_positions(b.windows, b.x.shape[1])[keep])
    return torch.cat(out_nll), torch.cat(out_bytes), torch.cat(out_pos)


def _window_scores(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    windows: list[Window],
    tables: ByteTables,
    device: torch.device,
    autocast: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of a batch of windows: nll (float64), bytes (float64), scored mask."""
    x, y, mask = (t.to(device) for t in window_batch(tokens, windows))
    with autocast_context(device, autocast):
        nll = model(x, y, reduction="none")
    return nll.float().double(), token_bytes(tables, x, y).double(), mask

"""SentencePiece BPE tokenizers in Parameter Golf's style, and per-token byte tables.

The byte tables turn a token stream back into a UTF-8 byte count, which is what
bits-per-byte divides by (PAPERS.md §2). Counting is a property of the tokenizer alone,
so it lives here and evaluation imports it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from qlab.errors import DataError
from qlab.io.atomic import atomic_write_bytes

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPACE_PIECE = "\u2581"  # "▁", SentencePiece's whitespace marker
# SentencePiece silently skips training sentences longer than this; we cut texts to fit.
_MAX_SENTENCE_CHARS = 4096


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike, seed: int = 0
) -> Path:
    """Train a SentencePiece BPE model on ``texts`` (in memory) and write it atomically.

    Settings follow Parameter Golf: byte fallback, split digits, nmt_nfkc, no dummy
    prefix, pad/bos/eos/unk = 0/1/2/3. "▁" is forced into the alphabet (required_chars)
    so it is always its own piece without blocking merges such as "▁the"; "\\n" is a
    user-defined symbol so newlines survive normalisation. One thread and no input
    shuffling make the result deterministic.
    """
    if vocab_size < 4 + 256 + 2:
        raise DataError(f"vocab_size {vocab_size} too small: need ≥ 262 for specials + 256 byte pieces")
    if vocab_size > 65536:
        raise DataError(f"vocab_size {vocab_size} does not fit uint16 shards (max 65536)")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            user_defined_symbols=["\n"],
            required_chars=SPACE_PIECE,
            character_coverage=0.9995,
            max_sentence_length=_MAX_SENTENCE_CHARS * 4,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataError(f"SentencePiece training for {out_path} failed: {exc}") from exc
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise DataError(f"trained tokenizer for {out_path} lacks the '▁' piece")
    return atomic_write_bytes(out_path, model)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Cut each text into ≤ 4096-character pieces at line breaks (never drop text)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + _MAX_SENTENCE_CHARS)
            if end < len(text):
                cut = text.rfind("\n", start + 1, end)
                end = cut + 1 if cut > start else end
            piece = text[start:end]
            if piece.strip():
                yield piece
            start = end


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model; DataError if the file is missing or not a model."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(str(path))
    except (RuntimeError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a valid SentencePiece model ({type(exc).__name__})") from None
    if not ok or sp.vocab_size() <= 0:
        raise DataError(f"{path}: not a valid SentencePiece model")
    try:  # a damaged model can load and still hold pieces that are not UTF-8
        for i in range(sp.vocab_size()):
            sp.id_to_piece(i)
    except (UnicodeDecodeError, RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: damaged SentencePiece model (piece {i}: {type(exc).__name__})") from None
    return sp


@dataclass(frozen=True)
class ByteTables:
    """Per-token-id byte accounting (PAPERS.md §2).

    base_bytes: UTF-8 bytes of the piece without its leading "▁" (byte pieces: 1,
    control/unknown/unused: 0). has_leading_space: piece starts with "▁".
    is_boundary: control/unknown/unused ids (and ids beyond the tokenizer's vocab).
    """

    base_bytes: torch.Tensor
    has_leading_space: torch.Tensor
    is_boundary: torch.Tensor

    def to(self, device: torch.device | str) -> ByteTables:
        return ByteTables(
            *(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary))
        )


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteTables:
    """Build tables of size max(sp vocab, vocab_size); extra ids (model padding) are boundaries."""
    n_sp = sp.vocab_size()
    size = max(n_sp, vocab_size or 0)
    base = torch.zeros(size, dtype=torch.int32)
    space = torch.zeros(size, dtype=torch.bool)
    boundary = torch.ones(size, dtype=torch.bool)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


def token_bytes(tables: ByteTables, prev_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Bytes each target token stands for: base[y] + (space[y] AND NOT boundary[x]).

    ``prev_ids`` and ``target_ids`` have the same shape; returns int32 of that shape.
    The leading space of a token that follows a boundary (e.g. BOS) is not counted,
    because no dummy prefix was ever added to the text.
    """
    if prev_ids.shape != target_ids.shape:
        raise DataError(
            f"token_bytes: prev_ids shape {tuple(prev_ids.shape)} != target {tuple(target_ids.shape)}"
        )
    n = tables.base_bytes.numel()
    for name, ids in (("prev_ids", prev_ids), ("target_ids", target_ids)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise DataError(f"token_bytes: {name} out of range [0, {n}) of the byte tables")
    prev_ids, target_ids = prev_ids.long(), target_ids.long()
    extra = tables.has_leading_space[target_ids] & ~tables.is_boundary[prev_ids]
    return tables.base_bytes[target_ids] + extra.to(torch.int32)

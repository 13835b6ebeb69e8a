"""Protein sequences -> ESM token ids.

ESM's 33-token alphabet (the order of the Hugging Face esm2 `vocab.txt`), each sequence framed as
`<cls> residues <eos>` and right-padded with <pad>. One token per character, except that a special token
written out in full inside a sequence (e.g. "MK<mask>LV") is that token.

Bad input: a character outside the alphabet (lowercase letters included; ESM is case-sensitive, as HF's
tokenizer is) becomes <unk> and is counted in `Tokens.unknown`; an empty sequence is an error; a sequence
longer than `max_length - 2` residues is truncated, keeping the final <eos>, and counted in
`Tokens.truncated`.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

ALPHABET = ("<cls>", "<pad>", "<eos>", "<unk>",
            "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
            "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")
INDEX = {t: i for i, t in enumerate(ALPHABET)}
CLS, PAD, EOS, UNK, MASK = (INDEX[t] for t in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>"))
_PIECE = re.compile("|".join(re.escape(t) for t in ALPHABET if t.startswith("<")) + "|.", re.S)


@dataclasses.dataclass
class Tokens:
    ids: np.ndarray             # (B, L) int32, <pad> after each sequence's <eos>
    attention_mask: np.ndarray  # (B, L) int32, 1 at real tokens (<cls> and <eos> included)
    unknown: int                # characters mapped to <unk>
    truncated: int              # sequences cut to fit max_length


def encode(seq: str) -> tuple[list[int], int]:
    """Residue ids of one sequence (no framing) and how many characters became <unk>."""
    pieces = _PIECE.findall(seq)
    return [INDEX.get(p, UNK) for p in pieces], sum(p not in INDEX for p in pieces)


def tokenize(seqs, max_length: int = 1026, pad_to: int | None = None) -> Tokens:
    """`<cls> seq <eos>` ids for each sequence, padded to the longest (or to `pad_to`). `max_length`
    counts the two framing tokens (1026 = ESM2's max_position_embeddings)."""
    if isinstance(seqs, str):
        raise TypeError("tokenize expects a list of sequences, got one string")
    if max_length < 3:
        raise ValueError(f"max_length={max_length}; expected at least 3 (<cls>, a residue, <eos>)")
    rows, unknown, truncated = [], 0, 0
    for i, seq in enumerate(seqs):
        if not isinstance(seq, str) or not seq:
            raise ValueError(f"sequence {i} is {seq!r}; expected a non-empty string of residue letters")
        ids, unk = encode(seq)
        unknown += unk
        if len(ids) > max_length - 2:
            ids, truncated = ids[:max_length - 2], truncated + 1
        rows.append([CLS] + ids + [EOS])
    if not rows:
        raise ValueError("no sequences to tokenize")
    width = max(len(r) for r in rows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest framed sequence ({width} tokens)")
        width = pad_to
    out = np.full((len(rows), width), PAD, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return Tokens(out, (out != PAD).astype(np.int32), unknown, truncated)

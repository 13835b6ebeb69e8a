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


def frame_and_pad(seqs, encode, prefix: list, suffix: list, pad_id: int, max_length: int,
                  pad_to: int | None = None) -> Tokens:
    """Shared by the protein tokenizers: `encode(seq) -> (ids, unknown count)` for each sequence, cut so that
    prefix + ids + suffix fits `max_length` (counted as truncated), padded with `pad_id` to the longest row
    (or to `pad_to`)."""
    if isinstance(seqs, str):
        raise TypeError("the tokenizer expects a list of sequences, got one string")
    room = max_length - len(prefix) - len(suffix)
    rows, unknown, truncated = [], 0, 0
    for i, seq in enumerate(seqs):
        if not isinstance(seq, str) or not seq:
            raise ValueError(f"sequence {i} is {seq!r}; expected a non-empty string of residue letters")
        ids, unk = encode(seq)
        unknown += unk
        if len(ids) > room:
            ids, truncated = ids[:room], truncated + 1
        rows.append(prefix + ids + suffix)
    if not rows:
        raise ValueError("no sequences to tokenize")
    width = max(len(r) for r in rows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest framed sequence ({width} tokens)")
        width = pad_to
    out = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)], mask[i, :len(r)] = r, 1
    return Tokens(out, mask, unknown, truncated)


def tokenize(seqs, max_length: int = 1026, pad_to: int | None = None) -> Tokens:
    """`<cls> seq <eos>` ids for each sequence, padded to the longest (or to `pad_to`). `max_length`
    counts the two framing tokens (1026 = ESM2's max_position_embeddings)."""
    if max_length < 3:
        raise ValueError(f"max_length={max_length}; expected at least 3 (<cls>, a residue, <eos>)")
    return frame_and_pad(seqs, encode, [CLS], [EOS], PAD, max_length, pad_to)


# ---------------------------------------------------------------- reading sequence files


def read_fasta(path: str) -> list[tuple[str, str]]:
    """[(header id, sequence)] from a FASTA file: '>' header lines, sequence lines joined, whitespace
    dropped. ValueError naming the file and line for sequence text before any header or an empty record."""
    records, name, parts, start = [], None, [], 0

    def close():
        if name is not None:
            if not parts:
                raise ValueError(f"{path}: record {name!r} (line {start}) has no sequence")
            records.append((name, "".join(parts)))

    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            if line.startswith(">"):
                close()
                name, parts, start = (line[1:].split() or [""])[0], [], n
            elif name is None:
                raise ValueError(f"{path}: line {n} holds sequence text before any '>' header; expected FASTA")
            else:
                parts.append("".join(line.split()))
    close()
    if not records:
        raise ValueError(f"{path}: no FASTA records (expected '>name' lines followed by sequence lines)")
    return records


CSV_CHAIN_COLUMNS = ("Ligand Sequences", "Receptor Sequences")


def read_chains_csv(path: str, columns=CSV_CHAIN_COLUMNS, group: str = "PDB") -> list[tuple[str, str]]:
    """[(group, chain)] from a CSV whose `columns` hold comma-separated chains (the affinity CSV), with the
    row's `group` column (the PDB id) as each chain's group; empty cells are skipped. ValueError naming a
    missing column."""
    import csv
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in (*columns, group):
            if col not in header:
                raise ValueError(f"{path}: no column {col!r} (it has {header[:8]}); expected the chain "
                                 f"columns {list(columns)} and {group!r}")
        out = [(row[group], chain.strip()) for row in reader for col in columns
               for chain in (row[col] or "").split(",") if chain.strip()]
    if not out:
        raise ValueError(f"{path}: no chains in columns {list(columns)}")
    return out

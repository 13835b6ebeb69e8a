"""Multi-chain protein-protein binding affinity data (the PPB-Affinity CSV format).

A CSV row is one complex: `Ligand Sequences` and `Receptor Sequences` hold comma-separated chains, `PDB`
the structure id (mutants of one complex share it), and the affinity is `KD(M)` (molar) and/or `pKd`.
../shared/data/ppi/skempi_multichain.csv is real data in this format (6,698 rows, 345 PDB ids).

Targets (`target=`): "abs_log10" is the reference's |log10(KD + 1e-10)|; "pkd" is -log10(KD). A row's KD
comes from `KD(M)` when that cell is filled, else from `pKd` (KD = 10^-pKd).

Bad input policy:
- missing `PDB`, chain columns, or both affinity columns; an empty chain (e.g. "AC,,DE" or an empty cell);
  a letter outside the residue alphabet (ESM's residue letters, upper case); KD <= 0, non-numeric, nan
  or inf; an empty PDB id -> ValueError naming the file, the CSV line and the column.
- duplicate rows (same PDB, same chains, same KD) -> the later copies are dropped and counted in
  `Dataset.duplicates` (duplicates="error" raises instead). Repeated measurements of the same chains with
  different KD are kept.

Splits never split a PDB id: `cv5_split` uses the dataset authors' 5 folds (cv5_pdb_split.json: fold k's
"val" list is the test set, the rest train; an optional validation set is carved out of train by whole PDB
groups); `grouped_split` does the same from `groups()`, which links complexes that share a PDB id or whose
chains are point mutants of each other (same chain lengths, >= `identity` identical positions).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re

import numpy as np

from jaxemb.data import proteins

LIGANDS, RECEPTORS, PDB, KD, PKD = "Ligand Sequences", "Receptor Sequences", "PDB", "KD(M)", "pKd"
RESIDUES = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")  # the residue letters of proteins.ALPHABET
TARGETS = ("abs_log10", "pkd")


@dataclasses.dataclass(frozen=True)
class Complex:
    pdb: str
    ligands: tuple[str, ...]
    receptors: tuple[str, ...]
    kd: float      # molar
    target: float
    line: int      # CSV line number (header is line 1)


@dataclasses.dataclass
class Dataset:
    complexes: list[Complex]
    target: str
    duplicates: int  # rows dropped as exact duplicates

    def __len__(self):
        return len(self.complexes)

    @property
    def y(self) -> np.ndarray:
        return np.array([c.target for c in self.complexes], np.float64)

    @property
    def pdbs(self) -> list[str]:
        return [c.pdb for c in self.complexes]


def kd_target(kd, target: str = "abs_log10"):
    """The regression target from KD in molar: |log10(KD + 1e-10)| (the reference) or pKd = -log10(KD)."""
    kd = np.asarray(kd, np.float64)
    if target == "abs_log10":
        return np.abs(np.log10(kd + 1e-10))
    if target == "pkd":
        return -np.log10(kd)
    raise ValueError(f"target={target!r}; expected one of {TARGETS}")


def _chains(cell: str, where: str) -> tuple[str, ...]:
    parts = [p.strip() for p in (cell or "").split(",")]
    for j, p in enumerate(parts):
        if not p:
            raise ValueError(f"{where}: chain {j} is empty (cell {cell!r}); expected comma-separated sequences")
        bad = sorted(set(p) - RESIDUES)
        if bad:
            raise ValueError(f"{where}: chain {j} has letters outside the residue alphabet: {bad} "
                             f"(expected upper-case letters from {''.join(sorted(RESIDUES))})")
    return tuple(parts)


def _number(cell: str, where: str) -> float:
    try:
        v = float(cell)
    except ValueError:
        raise ValueError(f"{where}: {cell!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: {cell!r} is not a finite number")
    return v


def read_affinity_csv(path: str, target: str = "abs_log10", duplicates: str = "drop") -> Dataset:
    """Complexes from a PPB-Affinity-format CSV (see the module docstring for the columns and policies)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return _read_rows(enumerate(reader, 2), reader.fieldnames or [], lambda line: f"{path}, line {line}",
                          path, target, duplicates)[0]


HUB_CONFIG = "filtered"  # the configuration ppiseq trains on


def is_hub_name(source: str) -> bool:
    """True for `owner/name` or `owner/name:config` that is not a local path (a hub dataset)."""
    return (re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", source or "") is not None and not os.path.exists(source)
            and not source.endswith(".csv"))


def read_affinity_hub(name: str, target: str = "abs_log10", duplicates: str = "drop",
                      load_dataset=None) -> tuple[Dataset, dict]:
    """(dataset, its own split) from a hub dataset in the PPB-Affinity format, e.g. `proteinea/ppb_affinity`
    (configuration `filtered`, as ppiseq; `proteinea/ppb_affinity:raw` picks another): its train, validation
    and test splits become {'train', 'val', 'test'} row indices. Needs the optional `datasets` library and a
    network (or its cache); the same checks as read_affinity_csv, with `split row i` in place of CSV lines."""
    if load_dataset is None:
        try:
            from datasets import load_dataset
        except ImportError:
            raise ImportError(f"reading the hub dataset {name!r} needs the `datasets` library "
                              "(pip install datasets); or pass a local CSV with --data") from None
    repo, _, config = name.partition(":")
    parts = load_dataset(repo, config or HUB_CONFIG, split=["train", "validation", "test"], trust_remote_code=True)
    rows, header = [], None
    for part, ds in zip(("train", "val", "test"), parts):
        header = header or list(ds.column_names)
        for i, row in enumerate(ds):
            rows.append(((part, i), row))
    where = lambda key: f"{name}, {key[0]} row {key[1]}"
    data, kept = _read_rows(rows, header or [], where, name, target, duplicates)
    owner = [key[0] for key in kept]
    split = {part: np.flatnonzero(np.array(owner) == part).astype(np.int64) for part in ("train", "val", "test")}
    return data, split


def _read_rows(rows, header, where, name, target, duplicates) -> tuple[Dataset, list]:
    """(Dataset, the key of each kept row) from (key, row dict) pairs; `where(key)` names a row in errors."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    if duplicates not in ("drop", "error"):
        raise ValueError(f"duplicates={duplicates!r}; expected 'drop' or 'error'")
    for col in (PDB, LIGANDS, RECEPTORS):
        if col not in header:
            raise ValueError(f"{name}: no column {col!r} (it has {header[:8]}); expected "
                             f"{[PDB, LIGANDS, RECEPTORS]} and {KD!r} and/or {PKD!r}")
    if KD not in header and PKD not in header:
        raise ValueError(f"{name}: neither {KD!r} nor {PKD!r} is a column (it has {header[:8]})")
    out, keys, seen, dropped = [], [], {}, 0
    cell = lambda row, col: "" if row.get(col) is None else str(row[col]).strip()
    for n, (key, row) in enumerate(rows):
        pdb = cell(row, PDB)
        if not pdb:
            raise ValueError(f"{where(key)}, column {PDB!r}: empty PDB id")
        lig = _chains(cell(row, LIGANDS), f"{where(key)}, column {LIGANDS!r}")
        rec = _chains(cell(row, RECEPTORS), f"{where(key)}, column {RECEPTORS!r}")
        if cell(row, KD):
            kd = _number(cell(row, KD), f"{where(key)}, column {KD!r}")
            if kd <= 0:
                raise ValueError(f"{where(key)}, column {KD!r}: KD={kd} must be > 0 (molar)")
        elif cell(row, PKD):
            kd = 10.0 ** -_number(cell(row, PKD), f"{where(key)}, column {PKD!r}")
        else:
            raise ValueError(f"{where(key)}: no affinity (both {KD!r} and {PKD!r} are empty)")
        dup = (pdb, lig, rec, kd)
        if dup in seen:
            if duplicates == "error":
                raise ValueError(f"{where(key)} duplicates {where(seen[dup])} (same PDB, chains, KD)")
            dropped += 1
            continue
        seen[dup] = key
        out.append(Complex(pdb, lig, rec, kd, float(kd_target(kd, target)), key if isinstance(key, int) else n))
        keys.append(key)
    if not out:
        raise ValueError(f"{name}: no data rows")
    return Dataset(out, target, dropped), keys


# ---------------------------------------------------------------- leak-free splits


def read_cv5(path: str) -> list[tuple[set, set]]:
    """[(train PDB ids, test PDB ids)] per fold from cv5_pdb_split.json ({"train": [5 lists], "val": [...]})."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict) or "train" not in d or "val" not in d or len(d["train"]) != len(d["val"]):
        raise ValueError(f"{path}: expected {{'train': [fold lists], 'val': [fold lists]}} of PDB ids")
    return [(set(tr), set(te)) for tr, te in zip(d["train"], d["val"])]


def _carve(idx: list, group_of, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split `idx` into (train, val) by whole groups, about `val_fraction` of the rows in val."""
    if not val_fraction:
        return idx, []
    names = sorted({group_of[i] for i in idx})
    np.random.default_rng(seed).shuffle(names)
    want, val_groups, count = val_fraction * len(idx), set(), 0
    sizes = {}
    for i in idx:
        sizes[group_of[i]] = sizes.get(group_of[i], 0) + 1
    for g in names:
        if count >= want:
            break
        val_groups.add(g)
        count += sizes[g]
    return [i for i in idx if group_of[i] not in val_groups], [i for i in idx if group_of[i] in val_groups]


def cv5_split(data: Dataset, split_path: str, fold: int = 0, val_fraction: float = 0.0,
              seed: int = 0) -> dict[str, np.ndarray]:
    """{'train', 'val', 'test'} row indices: fold `fold`'s test PDBs as test, the rest train, and
    `val_fraction` of the training rows moved to val by whole PDB ids. A PDB id in the data but not in the
    split file is an error."""
    folds = read_cv5(split_path)
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold={fold}; {split_path} has folds 0..{len(folds) - 1}")
    train_ids, test_ids = folds[fold]
    missing = sorted(set(data.pdbs) - train_ids - test_ids)
    if missing:
        raise ValueError(f"{len(missing)} PDB ids are in no fold of {split_path}, e.g. {missing[:5]}")
    test = [i for i, p in enumerate(data.pdbs) if p in test_ids]
    train = [i for i, p in enumerate(data.pdbs) if p not in test_ids]
    train, val = _carve(train, data.pdbs, val_fraction, seed)
    return {k: np.array(v, np.int64) for k, v in (("train", train), ("val", val), ("test", test))}


def _near(a: tuple, b: tuple, identity: float) -> bool:
    same = sum(x == y for ca, cb in zip(a, b) for x, y in zip(ca, cb))
    return same >= identity * sum(len(c) for c in a)


def groups(data: Dataset, identity: float = 0.9, use_pdb: bool = True) -> np.ndarray:
    """A group id per complex (union-find): complexes are linked when they share a PDB id (if `use_pdb`) or
    their chains are point mutants of each other — same number and lengths of chains on each side, in the
    same order, and at least `identity` of all positions identical. Insertion/deletion mutants are linked
    only through the PDB id."""
    n = len(data)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i, j):
        parent[find(i)] = find(j)

    by_key: dict = {}
    for i, c in enumerate(data.complexes):
        if use_pdb:
            by_key.setdefault(("pdb", c.pdb), []).append(i)
    # one representative per distinct chain set, compared only within the same length signature
    reps: dict = {}
    for i, c in enumerate(data.complexes):
        chains = c.ligands + c.receptors
        shape = (len(c.ligands), tuple(len(s) for s in chains))
        reps.setdefault(shape, {}).setdefault(chains, []).append(i)
    for members in by_key.values():
        for j in members[1:]:
            union(members[0], j)
    for sets in reps.values():
        items = list(sets.items())
        for a, (ca, ia) in enumerate(items):
            for j in ia[1:]:
                union(ia[0], j)
            for cb, ib in items[a + 1:]:
                if find(ia[0]) != find(ib[0]) and _near(ca, cb, identity):
                    union(ia[0], ib[0])
    roots = [find(i) for i in range(n)]
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int64)


def grouped_split(group_ids, test_fraction: float = 0.2, val_fraction: float = 0.0,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """{'train', 'val', 'test'} row indices with whole groups on one side (use when no split file)."""
    group_ids = np.asarray(group_ids)
    idx = list(range(len(group_ids)))
    rest, test = _carve(idx, group_ids, test_fraction, seed)
    train, val = _carve(rest, group_ids, val_fraction / max(1e-12, 1 - test_fraction), seed + 1)
    return {k: np.array(v, np.int64) for k, v in (("train", train), ("val", val), ("test", test))}


# ---------------------------------------------------------------- no-PLM baseline

_AA = "ACDEFGHIKLMNPQRSTVWY"


def composition_features(complexes) -> np.ndarray:
    """(N, 44) float64: per side (ligands, receptors), the 20 standard amino-acid fractions over all of that
    side's chains, log(1 + residues) and the number of chains."""
    rows = []
    for c in complexes:
        feats = []
        for side in (c.ligands, c.receptors):
            text = "".join(side)
            counts = np.array([text.count(a) for a in _AA], np.float64)
            feats += [*(counts / max(1, len(text))), math.log1p(len(text)), float(len(side))]
        rows.append(feats)
    return np.array(rows, np.float64)


def ridge_fit(x, y, alpha: float = 1.0):
    """Ridge regression on standardized features with an unpenalized intercept; returns predict(x)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1.0
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    b = y.mean()
    return lambda xn: ((np.asarray(xn, np.float64) - mu) / sd) @ w + b


def composition_baseline(data: Dataset, split: dict, alpha: float = 1.0) -> dict:
    """Amino-acid composition + ridge, fit on split['train'], scored on split['test']: the metrics
    regression_report gives (spearman, spearman_err, pearson, rmse, n)."""
    from jaxemb.metrics import regression_report
    x, y = composition_features(data.complexes), data.y
    predict = ridge_fit(x[split["train"]], y[split["train"]], alpha)
    return regression_report(y[split["test"]], predict(x[split["test"]]))


# ---------------------------------------------------------------- the token layouts the heads read


@dataclasses.dataclass(frozen=True)
class Vocab:
    """How a backbone tokenizes chains: encode(seq) -> (ids without framing, letters mapped to <unk>), the
    <eos> and <pad> ids, and the <cls> id opening every sequence (None: no <cls>, as T5 models)."""
    name: str
    encode: object
    eos: int
    pad: int
    cls: int | None = None


ESM = Vocab("esm", proteins.encode, proteins.EOS, proteins.PAD, proteins.CLS)


def t5_vocab(tokenizer) -> Vocab:
    """The Vocab of a jaxemb.models.t5.T5Tokenizer (ProtT5 or Ankh): chains end in </s>, no <cls>."""
    def encode(seq):
        ids = tokenizer.encode(seq)
        return ids, sum(i == tokenizer.unk_id for i in ids)
    return Vocab(f"t5-{tokenizer.style}", encode, tokenizer.eos_id, tokenizer.pad_id, None)


def fit_chains(lengths, room: int) -> list[int]:
    """Residues kept per chain so that they sum to at most `room`: the longest chains are cut first (one
    cap c, each chain keeps min(length, c)), every chain keeps at least one residue."""
    lengths = [int(n) for n in lengths]
    if sum(lengths) <= room:
        return lengths
    if room < len(lengths):
        raise ValueError(f"{len(lengths)} chains do not fit in {room} residue slots (one residue each)")
    lo, hi = 1, max(lengths)
    while lo < hi:  # the largest cap that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) for n in lengths) <= room else (lo, mid - 1)
    return [min(n, lo) for n in lengths]


def _framed(chains, room: int, vocab: Vocab):
    """Ids of chains joined as [<cls>] c1 <eos> c2 <eos> ..., chains cut (fit_chains) so that the residues
    fit `room`; (ids, chains cut, unknown letters)."""
    enc = [vocab.encode(s) for s in chains]
    keep = fit_chains([len(e) for e, _ in enc], room)
    ids = [] if vocab.cls is None else [vocab.cls]
    for (e, _), k in zip(enc, keep):
        ids += e[:k] + [vocab.eos]
    return ids, sum(k < len(e) for (e, _), k in zip(enc, keep)), sum(u for _, u in enc)


def _pad_rows(rows, width: int, pad: int):
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Truncation of the token layouts (widths include the framing tokens)."""
    max_chain: int = 1000  # tokens of one framed chain `<cls> chain <eos>` (HP)
    max_side: int = 2000   # tokens of one side `<cls> c1 <eos> c2 <eos> ...` (EC, PAD)
    max_joint: int = 2000  # tokens of `<cls> L1 <eos> ... R1 <eos> ...` (SC) and of a packed complex (HP)



def layouts(complexes, layout: Layout = Layout(), vocab: Vocab = ESM) -> dict:
    """Every token layout of the complexes in a backbone's ids (`vocab`; ESM2's by default; T5 models have
    no <cls> and end chains with </s>), as arrays with one row per complex unless noted, each cut to
    `layout` keeping every chain's <eos> (the longest chains cut first):

    lig, rec (N, Ws) + lig_len, rec_len (N,)   one sequence per side, `<cls> c1 <eos> c2 <eos> ...` (EC, PAD)
    sc (N, Wj) + sc_len                         `<cls> L1 <eos> ... R1 <eos> ...`, ligands first (SC)
    chain_tokens (Nc, Wc) + chain_tokens_len    the distinct chains, each `<cls> chain <eos>` (a table)
    chain_idx (N, C) int32                      each complex's rows of that table, ligands first, -1 after
    n_lig, n_rec (N,)                           chains per side
    packed (N, Wp) + packed_seg (N, Wp)         a complex's framed chains packed in one row, segment ids
                                                1, 2, ... per chain (ligands first), 0 = padding (HP)
    plus counts: 'cut' (sequences with a chain cut, per layout) and 'unknown' (letters mapped to <unk>).
    """
    if not complexes:
        raise ValueError("no complexes to lay out")
    for name in ("max_chain", "max_side", "max_joint"):
        if getattr(layout, name) < 3:
            raise ValueError(f"layout {name}={getattr(layout, name)}; expected at least 3 tokens")
    c0 = vocab.cls is not None  # tokens a sequence spends on <cls>
    lig, rec, sc, packed, seg, idx = [], [], [], [], [], []
    table, rows = {}, []
    cut = {"side": 0, "sc": 0, "chain": 0, "packed": 0}
    unknown = 0
    for c in complexes:
        chains = c.ligands + c.receptors
        for side, out in ((c.ligands, lig), (c.receptors, rec)):
            ids, k, _ = _framed(side, layout.max_side - c0 - len(side), vocab)
            out.append(ids)
            cut["side"] += k > 0
        ids, k, u = _framed(chains, layout.max_joint - c0 - len(chains), vocab)
        sc.append(ids)
        cut["sc"] += k > 0
        unknown += u
        # packed: every chain framed on its own, the longest cut first so that the row fits
        enc = [vocab.encode(s)[0] for s in chains]
        keep = fit_chains([len(e) for e in enc], layout.max_joint - (1 + c0) * len(chains))
        keep = [min(k, layout.max_chain - 1 - c0) for k in keep]
        row, ids_seg = [], []
        for j, (e, kj) in enumerate(zip(enc, keep), 1):
            framed = ([vocab.cls] if c0 else []) + e[:kj] + [vocab.eos]
            row += framed
            ids_seg += [j] * len(framed)
        packed.append(row)
        seg.append(ids_seg)
        cut["packed"] += any(kj < len(e) for e, kj in zip(enc, keep))
        slots = []
        for s in chains:
            if s not in table:
                table[s] = len(rows)
                ids, k, _ = _framed([s], layout.max_chain - 1 - c0, vocab)
                rows.append(ids)
                cut["chain"] += k > 0
            slots.append(table[s])
        idx.append(slots)
    n_lig = np.array([len(c.ligands) for c in complexes], np.int32)
    n_rec = np.array([len(c.receptors) for c in complexes], np.int32)
    width = lambda rs: max(len(r) for r in rs)
    out = {}
    for name, rs in (("lig", lig), ("rec", rec), ("sc", sc), ("chain_tokens", rows), ("packed", packed)):
        w = width(lig + rec) if name in ("lig", "rec") else width(rs)  # the sides share one width (one encoder call)
        out[name], out[name + "_len"] = _pad_rows(rs, w, vocab.pad)
    out["packed_seg"] = _pad_rows(seg, out["packed"].shape[1], 0)[0]
    del out["packed_len"]
    cmax = int((n_lig + n_rec).max())
    out["chain_idx"] = np.array([s + [-1] * (cmax - len(s)) for s in idx], np.int32)
    out.update(n_lig=n_lig, n_rec=n_rec, cut=cut, unknown=unknown)
    return out

"""Knowledge-graph triples: the standard split format, vocabularies, reciprocal relations, the filter of
known true tails, batch sources for 1-vs-all training and filtered ranking, and a download helper.

Format: a dataset directory holds train.txt, valid.txt and test.txt, one `head<TAB>relation<TAB>tail`
triple per line (lines without a tab may separate the three fields by spaces). Blank lines are skipped.
A missing file, an empty split or a malformed line raises `KGFormatError` (FileNotFoundError for a missing
file) naming the file and the line number.

Entities or relations of valid/test that never occur in train ("unseen") follow `unseen=`:
  'keep'  (default, the usual protocol): vocabularies are built over all splits, the triples are ranked
          and the number of such triples is reported in `KG.unseen`;
  'skip'  vocabularies come from train only; such triples are dropped and counted in `KG.unseen`;
  'error' the first one raises KGFormatError naming file, line and the unseen name.

Duplicate triples within a split and valid/test triples that also occur in train are kept as given,
counted in `KG.duplicates` and `KG.in_train`, and reported in one warning when there are any. A UTF-8
byte-order mark at the start of a file is dropped.

Reciprocal relations: every (h, r, t) also gives (t, r + R, h), so a model only ever predicts tails.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field

import numpy as np

from jaxemb.data.files import sha256_file
from jaxemb.data.sources import ArraySource

SPLITS = ("train", "valid", "test")


class KGFormatError(ValueError):
    pass


def read_triples(path: str) -> list[tuple[str, str, str, int]]:
    """(head, relation, tail, line number) for every non-blank line of `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: triple file not found (expected head<TAB>relation<TAB>tail lines)")
    out = []
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not part of the first name
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise KGFormatError(f"{path}:{no}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            fields = [x.strip() for x in fields]
            if len(fields) != 3 or not all(fields):
                raise KGFormatError(f"{path}:{no}: expected head<TAB>relation<TAB>tail, got {line[:80]!r}")
            out.append((fields[0], fields[1], fields[2], no))
    if not out:
        raise KGFormatError(f"{path}: split is empty (no triples)")
    return out


@dataclass
class KG:
    """Integer triples (n, 3) = (head, relation, tail) with relation ids in [0, R); reciprocals not included."""
    name: str
    entities: list
    relations: list
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    unseen: dict = field(default_factory=dict)  # split -> number of triples with an entity/relation unseen in train
    duplicates: dict = field(default_factory=dict)  # split -> triples that repeat an earlier one of that split
    in_train: dict = field(default_factory=dict)  # 'valid'/'test' -> triples that also occur in train

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        """Relations including reciprocals (2R)."""
        return 2 * len(self.relations)

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def resolve(source: str, root: str = "") -> str:
    """A dataset directory: `source` itself if it holds train.txt, else root/source (case-insensitive name)."""
    if os.path.isfile(os.path.join(source, "train.txt")):
        return source
    if root and os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.lower() == source.lower() and os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
    known = sorted(os.listdir(root)) if root and os.path.isdir(root) else []
    raise FileNotFoundError(f"dataset {source!r}: no {os.path.join(source, 'train.txt')} and no such dataset "
                            f"under {root!r} (known: {', '.join(known) or 'none'}); download it with "
                            f"jaxemb.data.kg.download(name, root)")


def load(source: str, root: str = "", unseen: str = "keep") -> KG:
    """Reads a dataset directory (or a dataset name under `root`); see the module docstring."""
    if unseen not in ("keep", "skip", "error"):
        raise ValueError(f"unseen={unseen!r}; expected 'keep', 'skip' or 'error'")
    path = resolve(source, root)
    raw = {s: read_triples(os.path.join(path, f"{s}.txt")) for s in SPLITS}
    vocab_splits = SPLITS if unseen == "keep" else ("train",)
    entities = sorted({x for s in vocab_splits for h, _, t, _ in raw[s] for x in (h, t)})
    relations = sorted({r for s in vocab_splits for _, r, _, _ in raw[s]})
    ent_id = {e: i for i, e in enumerate(entities)}
    rel_id = {r: i for i, r in enumerate(relations)}
    train_ent = {x for h, _, t, _ in raw["train"] for x in (h, t)}
    train_rel = {r for _, r, _, _ in raw["train"]}
    arrays, counts = {}, {}
    for s in SPLITS:
        rows, n_unseen = [], 0
        for h, r, t, no in raw[s]:
            missing = [x for x in (h, t) if x not in train_ent] + ([r] if r not in train_rel else [])
            if missing:
                n_unseen += 1
                if unseen == "error":
                    raise KGFormatError(f"{os.path.join(path, s + '.txt')}:{no}: {missing[0]!r} does not occur "
                                        f"in train.txt (unseen='error'; use 'keep' or 'skip')")
                if unseen == "skip":
                    continue
            rows.append((ent_id[h], rel_id[r], ent_id[t]))
        if not rows:
            raise KGFormatError(f"{os.path.join(path, s + '.txt')}: no triples left after skipping unseen ones")
        arrays[s] = np.asarray(rows, np.int32)
        if s != "train":
            counts[s] = n_unseen
    duplicates, in_train = overlap_counts(arrays)
    name = os.path.basename(os.path.normpath(path))
    if any(duplicates.values()) or any(in_train.values()):
        warnings.warn(f"dataset {name} ({path}): duplicate triples per split {duplicates}; valid/test triples "
                      f"also in train {in_train} (kept as given)", stacklevel=2)
    return KG(name, entities, relations, arrays["train"], arrays["valid"], arrays["test"], counts, duplicates,
              in_train)


def overlap_counts(arrays: dict) -> tuple[dict, dict]:
    """({split: rows that repeat an earlier row of that split}, {'valid'/'test': rows that occur in train})
    for (n, 3) integer triples per split."""
    size = int(max(a.max() for a in arrays.values())) + 1
    keys = {s: np.sort((a[:, 0].astype(np.int64) * size + a[:, 1]) * size + a[:, 2]) for s, a in arrays.items()}
    duplicates = {s: int((np.diff(k) == 0).sum()) for s, k in keys.items()}
    train = keys["train"]
    in_train = {}
    for s, k in keys.items():
        if s != "train":
            i = np.minimum(np.searchsorted(train, k), len(train) - 1)
            in_train[s] = int((train[i] == k).sum())
    return duplicates, in_train


def reciprocal(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """(n, 3) -> (2n, 3): the triples, then (t, r + R, h) for each. `num_relations` is 2R."""
    inv = np.stack([triples[:, 2], triples[:, 1] + num_relations // 2, triples[:, 0]], axis=1)
    return np.concatenate([triples, inv]).astype(np.int32)


class Filter:
    """All true tails of each (head, relation) query over train + valid + test (with reciprocals)."""

    def __init__(self, kg: KG):
        allt = np.concatenate([reciprocal(kg.split(s), kg.num_relations) for s in SPLITS]).astype(np.int64)
        self.num_relations = kg.num_relations
        pairs = np.unique((allt[:, 0] * kg.num_relations + allt[:, 1]) * kg.num_entities + allt[:, 2])
        self.keys, self.tails = pairs // kg.num_entities, (pairs % kg.num_entities).astype(np.int32)
        self.ukeys, self.starts, counts = np.unique(self.keys, return_index=True, return_counts=True)
        self.ends = self.starts + counts

    def known(self, head: int, rel: int) -> np.ndarray:
        i = np.searchsorted(self.ukeys, head * self.num_relations + rel)
        if i == len(self.ukeys) or self.ukeys[i] != head * self.num_relations + rel:
            return np.zeros(0, np.int32)
        return self.tails[self.starts[i]:self.ends[i]]

    def others(self, queries: np.ndarray, width: int) -> np.ndarray:
        """(B, 3) queries -> (B, width) true tails other than each query's own tail, padded with -1."""
        out = np.full((len(queries), width), -1, np.int32)
        for i, (h, r, t) in enumerate(queries):
            k = self.known(h, r)
            k = k[k != t]
            if len(k) > width:
                raise ValueError(f"query {i} has {len(k)} other true tails, more than width {width}")
            out[i, :len(k)] = k
        return out

    @property
    def max_others(self) -> int:
        """The most true tails any query has besides its own."""
        return int((self.ends - self.starts).max()) - 1


def _columns(triples: np.ndarray) -> dict:
    return {"head": triples[:, 0], "rel": triples[:, 1], "tail": triples[:, 2]}


class TrainSource(ArraySource):
    """Shuffled 1-vs-all training batches: {'head', 'rel', 'tail'} (B,) int32 and 'weights' (B,) float32.

    Epoch e visits the triples in `epoch_order(seed, e)`; its last batch is padded with weight-0 rows, so
    an epoch is num_batches = ceil(n / B) steps and every triple is seen once.
    """

    def __init__(self, triples: np.ndarray, batch_size: int, seed: int = 0):
        if len(triples) == 0:
            raise ValueError("no training triples")
        super().__init__(_columns(triples), batch_size, seed=seed, shuffle=True, what="training triples")


class QuerySource(ArraySource):
    """Fixed ranking queries in order: {'head', 'rel', 'tail', 'weights'} (B,) and 'filter' (B, K) int32
    (other true tails, -1 padded; K = the graph's largest count rounded up to a multiple of 8: one shape for
    every split, so the ranking step compiles once). The last batch is padded with weight-0 rows."""

    def __init__(self, queries: np.ndarray, filt: Filter, batch_size: int):
        if len(queries) == 0:
            raise ValueError("no ranking queries")
        self.queries, self.filt = queries, filt
        self.width = max(8, -(-filt.max_others // 8) * 8)
        super().__init__(_columns(queries), batch_size, make=self._with_filter, what="ranking queries")

    def _with_filter(self, batch: dict) -> dict:
        q = np.stack([batch["head"], batch["rel"], batch["tail"]], axis=1)
        return dict(batch, filter=self.filt.others(q, self.width))


# -- download (for users with a network; never run in tests against the network) -------------------------

URLS = {name: f"https://github.com/TimDettmers/ConvE/raw/master/{name}.tar.gz"
        for name in ("WN18RR", "FB15k-237", "umls", "kinship", "nations")}
# sha256 of train/valid/test.txt as distributed in the ConvE archives (computed from copies of those files).
SHA256 = {
    "WN18RR": ("038612e783c215ee5f3ca9fbfca27b8d0739be1028fe4ee7c174aecf0b83d5df",
               "453ce7202afa58094a04d2b1560ee2b02660f1c260b32ce6651c8ccedd1028ab",
               "0383bceaaa1096cf3c03ec021ed0048068e2355dbfc0239b292cefdac821cec5"),
    "FB15k-237": ("6e4c2782169af21e9743f3b1d200886f5d595bf6bc504ec1351720949c5cdfae",
                  "cf6309010852f6a8d47a45df830a426415d1ee6f7a3970a8376ff1fb81db4a5c",
                  "5711cf41623ceb4eacc50eb6108a3ca6565c7492e3caaf82a3e355cc660d1574"),
    "umls": ("873ef4925516b83e7f6f8cc02b4be51d848828710a7f65a956f0ac4a9e452f35",
             "025c98f8a4891e2a6582ec5b40ee0d904031edad9c52554522f4b7904820c98e",
             "a7eb529a3d2810fcc96341ccc97c625a5e202f8389673aa6bd317eeebbb79014"),
    "kinship": ("738612111a6acf0e39662bde24c7e72a4d1edf20931beea077da367dda689731",
                "c56f8630a583178b1e569f11a64aa535ae1ce0b0912d8b1e24716be2b37f04da",
                "05e5733265761d55be9c05bfaff5a8d0808df46f9c1e9d66cc3f2fe114e43d88"),
    "nations": ("0830fa9da8e5bba2ccdaa45b7bdc9130451ba66b09ff2708f35fccaf82473e57",
                "2b337a62e51a2f45c283eac98a70d21b7e0e102136be1539b2a52c652a7b0530",
                "3971085165b47b6aeaec68058c6d8d98b3005e929db81268410b95ae4db770ab"),
}


def fetch(url: str, dest: str, sha256: str | None = None, timeout: float = 60) -> str:
    """Downloads `url` to `dest` atomically (temp file in the same folder, then rename); with `sha256` the
    content must match or nothing is written and ValueError names url, expected and actual digests."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if sha256 and h.hexdigest() != sha256:
            raise ValueError(f"{url}: sha256 {h.hexdigest()} does not match the expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def download(name: str, root: str, url: str | None = None, checksums: tuple | None = None) -> str:
    """Fetches dataset `name` (a .tar.gz holding train/valid/test.txt) into root/name and returns that path.

    Each split file is checked against its sha256 (`checksums` = (train, valid, test), default SHA256[name]);
    the directory appears only once all three are verified. An existing complete directory is returned as is.
    """
    target = os.path.join(root, name)
    if all(os.path.isfile(os.path.join(target, f"{s}.txt")) for s in SPLITS):
        return target
    if url is None and name not in URLS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(URLS)} (or pass url=)")
    url = url or URLS[name]
    checksums = checksums if checksums is not None else SHA256.get(name)
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        archive = fetch(url, os.path.join(tmp, "archive.tar.gz"))
        out = os.path.join(tmp, name)
        os.makedirs(out)
        with tarfile.open(archive) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for i, s in enumerate(SPLITS):
                if f"{s}.txt" not in members:
                    raise ValueError(f"{url}: archive has no {s}.txt (members: {sorted(members)})")
                dest = os.path.join(out, f"{s}.txt")
                with tar.extractfile(members[f"{s}.txt"]) as src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
                if checksums and sha256_file(dest) != checksums[i]:
                    raise ValueError(f"{url}: {s}.txt has sha256 {sha256_file(dest)}, expected {checksums[i]}")
        if os.path.isdir(target):
            shutil.rmtree(target)  # an incomplete earlier copy
        os.replace(out, target)
    return target

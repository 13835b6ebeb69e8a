"""Text data: tokenizers, corpora, a deterministic split, packing and batch sources.

Corpora (`load_corpus(spec)`):
  'stdlib'           the Python standard library's own .py files (a real code corpus on every machine)
  'pydoc'            `pydoc_data.topics` (English documentation prose)
  'default'          both
  'tfds:NAME[:SPLIT[:FEATURE]]'  a TensorFlow Datasets dataset (the `tfds` extra; needs it prepared or a network)
  any other string   a text file or a directory of text files (read recursively)
"""
from __future__ import annotations

import codecs
import hashlib
import os
import sysconfig
import warnings

import numpy as np

from jaxemb.data.sources import ArraySource

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".json", ".csv", ".c", ".h", ".html", "")


# -- tokenizers ------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless on any text."""
    vocab_size = 256
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", "replace")


class SentencePieceTokenizer:
    """A sentencepiece vocabulary trained locally on the training documents (the `spm` extra)."""
    name = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.model_file = model_file

    @classmethod
    def train(cls, docs: list[str], vocab_size: int, model_file: str, max_chars: int = 20_000_000):
        """Trains a unigram model with byte fallback (lossless) and writes it atomically to model_file."""
        import io
        import sentencepiece as spm
        if os.path.exists(model_file):
            return cls(model_file)
        buf = io.BytesIO()
        lines = (line for d in docs for line in d.splitlines() if line.strip())
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=buf, vocab_size=vocab_size, model_type="unigram",
            byte_fallback=True, character_coverage=0.9995, input_sentence_size=max_chars // 100,
            shuffle_input_sentence=True, max_sentence_length=16384, minloglevel=2,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            hard_vocab_limit=False)  # a small corpus may support fewer pieces than asked for
        os.makedirs(os.path.dirname(os.path.abspath(model_file)), exist_ok=True)
        tmp = model_file + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, model_file)
        return cls(model_file)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# -- corpora ---------------------------------------------------------------------------------------------

def stdlib_docs(max_chars: int = 4_000_000) -> list[str]:
    """The standard library's .py files (tests and site-packages excluded), in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib",
                                                             "__pycache__", "lib2to3", "turtledemo"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if text.strip():
                    docs.append(text)
                    total += len(text)
                    if total >= max_chars:
                        return docs
    return docs


def pydoc_docs() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def _read_text_file(path: str) -> tuple[str | None, bool]:
    """(text, latin1): text is None for a binary file (NUL bytes); a file that is not UTF-8 is read as
    Latin-1 (every byte is one character, nothing is lost) and latin1 is True. A UTF-8 BOM is dropped."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw[:4096]:
        return None, False  # binary
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


def _warn_latin1(where: str, paths: list[str], total: int):
    names = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    warnings.warn(f"{where}: {len(paths)} of {total} text files are not UTF-8 and were read as Latin-1: {names}",
                  stacklevel=2)


def path_docs(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist (expected a text file, a directory of "
                                "text files, 'default', 'stdlib', 'pydoc' or 'tfds:NAME')")
    if os.path.isfile(path):
        text, latin1 = _read_text_file(path)
        if text is None:
            raise ValueError(f"data file {path!r} is binary, not text (it holds NUL bytes)")
        if latin1:
            _warn_latin1(f"data file {path!r}", [path], 1)
        return [text]
    docs, latin1_paths = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in TEXT_SUFFIXES and not name.startswith("."):
                file = os.path.join(dirpath, name)
                text, latin1 = _read_text_file(file)
                if text is not None and text.strip():
                    docs.append(text)
                    if latin1:
                        latin1_paths.append(os.path.relpath(file, path))
    if latin1_paths:
        _warn_latin1(f"data directory {path!r}", latin1_paths, len(docs))
    if not docs:
        raise ValueError(f"data directory {path!r} holds no non-empty text files "
                         f"(looked for suffixes {', '.join(s for s in TEXT_SUFFIXES if s)} and none)")
    return docs


def tfds_docs(spec: str, data_dir: str | None = None, max_docs: int = 100_000) -> list[str]:
    """'tfds:NAME[:SPLIT[:FEATURE]]' read through tensorflow-datasets' random-access data source."""
    parts = spec.split(":")
    name = parts[1]
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    feature = parts[3] if len(parts) > 3 else None
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("tfds data needs the tfds extra: pip install -e '.[tfds]'") from e
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")  # random access, no TF
    builder.download_and_prepare()
    source = builder.as_data_source(split=split)
    docs = []
    for i in range(min(len(source), max_docs)):
        rec = source[i]
        key = feature or next((k for k in ("text", "content", "document") if k in rec), None)
        if key is None:
            raise ValueError(f"tfds dataset {name!r} records have features {sorted(rec)}; name the text "
                             f"feature as tfds:{name}:{split}:FEATURE")
        value = rec[key]
        docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return docs


def load_corpus(spec: str, max_chars: int = 4_000_000, tfds_data_dir: str | None = None) -> list[str]:
    """Documents of the corpus named by `spec` (see module docstring). Raises on an empty corpus."""
    if spec == "stdlib":
        docs = stdlib_docs(max_chars)
    elif spec == "pydoc":
        docs = pydoc_docs()
    elif spec == "default":
        docs = stdlib_docs(max_chars) + pydoc_docs()
    elif spec.startswith("tfds:"):
        docs = tfds_docs(spec, tfds_data_dir)
    else:
        docs = path_docs(spec)
    docs = [d for d in docs if d.strip()]
    if not docs or sum(len(d) for d in docs) == 0:
        raise ValueError(f"corpus {spec!r} is empty: it holds no text")
    return docs


# -- split and packing -----------------------------------------------------------------------------------

def chunk_docs(docs: list[str], min_docs: int = 40, chunk_chars: int = 16_384) -> list[str]:
    """A corpus of very few documents (one big file) is cut into pieces at line breaks, so the split below
    has documents to split."""
    if len(docs) >= min_docs:
        return docs
    out = []
    for d in docs:
        start = 0
        while start < len(d):
            end = min(start + chunk_chars, len(d))
            cut = d.rfind("\n", start + chunk_chars // 2, end) if end < len(d) else -1
            end = cut + 1 if cut > 0 else end
            out.append(d[start:end])
            start = end
    return out


def split_docs(docs: list[str], valid_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split by a hash of (seed, document text): the same documents land in valid on every
    machine and run, whatever their order. Both sides get at least one document (with valid_fraction > 0);
    a corpus of one document (e.g. one small file) is split by characters instead, see split_text."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction!r}: expected a number in [0, 1)")
    if not docs:
        raise ValueError("no documents to split")
    if len(docs) == 1 and valid_fraction > 0:
        return split_text(docs[0], valid_fraction)
    train, valid, valid_keys = [], [], []
    for d in docs:
        h = hashlib.sha256(f"{seed}:".encode() + d.encode("utf-8", "surrogatepass")).digest()
        key = int.from_bytes(h[:8], "little") / 2 ** 64
        if key < valid_fraction:
            valid.append(d)
            valid_keys.append(key)
        else:
            train.append(d)
    if not train:  # every document hashed into valid: the one nearest to train goes back
        train.append(valid.pop(int(np.argmax(valid_keys))))
    if not valid and valid_fraction > 0:
        valid.append(train.pop())
    return train, valid


def split_text(doc: str, valid_fraction: float) -> tuple[list[str], list[str]]:
    """One document -> ([train text], [valid text]): the last valid_fraction of its characters are validation
    text, moved back to the start of a line where that keeps at least half for training."""
    n = len(doc)
    if n < 2:
        raise ValueError(f"the corpus is one document of {n} character(s); it needs at least 2 to give both "
                         "training and validation text (and enough for one batch of sequences of each)")
    cut = n - max(1, round(n * valid_fraction))
    line = doc.rfind("\n", 0, cut) + 1
    if line >= n / 2:
        cut = line
    return [doc[:cut]], [doc[cut:]]


def _check_seq_len(seq_len: int):
    if seq_len < 2:
        raise ValueError(f"sequence length must be >= 2 (a token and the next one to predict), got {seq_len}")


def pack(token_docs: list[np.ndarray], seq_len: int) -> dict:
    """Packs documents back to back into rows of seq_len + 1 tokens (inputs and shifted targets).

    Returns {'tokens': (N, seq_len + 1) int32, 'segments': (N, seq_len + 1) int32}; segment ids start at
    1 in each row and change at every document boundary; 0 marks padding at the end of the last row.
    """
    _check_seq_len(seq_len)
    if not any(len(t) for t in token_docs):
        raise ValueError(f"nothing to pack: {len(token_docs)} documents with no tokens")
    width = seq_len + 1
    flat = np.concatenate([np.asarray(t, np.int32) for t in token_docs if len(t)])
    doc_id = np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(token_docs) if len(t)])
    rows = -(-len(flat) // width)
    tokens = np.zeros(rows * width, np.int32)
    docs = np.full(rows * width, -1, np.int32)
    tokens[:len(flat)], docs[:len(flat)] = flat, doc_id
    tokens, docs = tokens.reshape(rows, width), docs.reshape(rows, width)
    change = np.concatenate([np.ones((rows, 1), bool), docs[:, 1:] != docs[:, :-1]], axis=1)
    segments = np.where(docs >= 0, np.cumsum(change, axis=1), 0).astype(np.int32)
    return {"tokens": tokens, "segments": segments}


def contiguous_rows(token_docs: list[np.ndarray], seq_len: int, max_rows: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens, each from inside one document (no boundary): position t of a row has
    exactly t tokens of context. Used for per-position evaluation. (N, seq_len + 1) int32."""
    _check_seq_len(seq_len)
    width = seq_len + 1
    rows = []
    for t in token_docs:
        for start in range(0, len(t) - width + 1, width):
            rows.append(np.asarray(t[start:start + width], np.int32))
            if len(rows) >= max_rows:
                return np.stack(rows)
    if not rows:
        raise ValueError(f"no document is long enough for one evaluation row of {width} tokens")
    return np.stack(rows)


def lm_batch(tokens: np.ndarray, segments: np.ndarray) -> dict:
    """Model inputs from packed rows: inputs/targets shifted by one, weights 1 where the target belongs to
    the same document as the input."""
    seg_in, seg_out = segments[:, :-1], segments[:, 1:]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg_in,
            "weights": ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32)}


def _lm_rows(batch: dict) -> dict:
    return lm_batch(batch["tokens"], batch["segments"])


class PackedSource(ArraySource):
    """Batches over packed rows (`pack`). Training (shuffle=True): epoch e visits the rows in
    `epoch_order(seed, e)` and drops the last partial batch. Evaluation (shuffle=False): the rows in order,
    the last partial batch padded with weight-0 rows."""

    def __init__(self, packed: dict, batch_size: int, seed: int = 0, shuffle: bool = True):
        super().__init__(packed, batch_size, seed=seed, shuffle=shuffle, drop_last=shuffle, make=_lm_rows,
                         what="packed rows")


def _lm_whole_rows(batch: dict) -> dict:
    return lm_batch(batch["tokens"], np.ones_like(batch["tokens"]))


class RowsSource(ArraySource):
    """Fixed evaluation rows (N, L + 1), each inside one document (`contiguous_rows`), in order; the last
    partial batch is padded with weight-0 rows."""

    def __init__(self, rows: np.ndarray, batch_size: int):
        super().__init__({"tokens": rows}, batch_size, make=_lm_whole_rows, what="evaluation rows")

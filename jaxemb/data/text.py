"""Text data: tokenizers, corpora, a deterministic split, packing and batch sources.

Corpora (`load_corpus(spec)`):
  'stdlib'           the Python standard library's own .py files (a real code corpus on every machine)
  'pydoc'            `pydoc_data.topics` (English documentation prose)
  'default'          both
  'tfds:NAME[:SPLIT[:FEATURE]]'  a TensorFlow Datasets dataset (the `tfds` extra; needs it prepared or a network)
  any other string   a text file or a directory of text files (read recursively)
"""
from __future__ import annotations

import hashlib
import os
import sysconfig

import numpy as np

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


def _read_text_file(path: str) -> str | None:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw[:4096]:
        return None  # binary
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def path_docs(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist (expected a text file, a directory of "
                                "text files, 'default', 'stdlib', 'pydoc' or 'tfds:NAME')")
    if os.path.isfile(path):
        text = _read_text_file(path)
        if text is None:
            raise ValueError(f"data file {path!r} is not UTF-8 text")
        return [text]
    docs = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in TEXT_SUFFIXES and not name.startswith("."):
                text = _read_text_file(os.path.join(dirpath, name))
                if text is not None and text.strip():
                    docs.append(text)
    if not docs:
        raise ValueError(f"data directory {path!r} holds no non-empty UTF-8 text files "
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
    machine and run, whatever their order."""
    train, valid = [], []
    for d in docs:
        h = hashlib.sha256(f"{seed}:".encode() + d.encode("utf-8", "surrogatepass")).digest()
        (valid if int.from_bytes(h[:8], "little") / 2 ** 64 < valid_fraction else train).append(d)
    if not train:
        raise ValueError(f"valid_fraction={valid_fraction} leaves no training documents ({len(docs)} in all)")
    if not valid and valid_fraction > 0:
        valid.append(train.pop())
    return train, valid


def _check_seq_len(seq_len: int):
    if seq_len < 2:
        raise ValueError(f"sequence length must be >= 2 (a token and the next one to predict), got {seq_len}")


def pack(token_docs: list[np.ndarray], seq_len: int) -> dict:
    """Packs documents back to back into rows of seq_len + 1 tokens (inputs and shifted targets).

    Returns {'tokens': (N, seq_len + 1) int32, 'segments': (N, seq_len + 1) int32}; segment ids start at
    1 in each row and change at every document boundary; 0 marks padding at the end of the last row.
    """
    _check_seq_len(seq_len)
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


class PackedSource:
    """Deterministic batches over packed rows: epoch e visits the rows in a permutation seeded by
    (seed, e); batch i is always the same rows, so resuming at position i continues exactly."""

    def __init__(self, packed: dict, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.tokens, self.segments = packed["tokens"], packed["segments"]
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_rows = len(self.tokens)
        if self.num_rows < batch_size:
            raise ValueError(f"{self.num_rows} packed rows are fewer than one batch of {batch_size}; "
                             "use more data, a shorter sequence or a smaller batch")
        self.batches_per_epoch = self.num_rows // batch_size
        self._perm_epoch, self._perm = None, None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                          if self.shuffle else np.arange(self.num_rows))
            self._perm_epoch = epoch
        return self._perm

    def get(self, index: int, rows: slice = slice(None)) -> dict:
        epoch, i = divmod(index, self.batches_per_epoch)
        idx = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size][rows]
        return lm_batch(self.tokens[idx], self.segments[idx])

"""A Unicode-centric tokenizer with a fixed vocabulary of 65,536 ids (Bochkov 2025).

Id layout (one id per Basic Multilingual Plane slot):
  U+0000..U+D7FF, U+F900..U+FFFF   the character with that code point (id = code point)
  U+E000..U+E0FF                   256 special slots: <pad>, <s>, </s>, <unk>, then <r4>..<r255> reserved
  U+E100..U+F8FF                   learned 2- and 3-grams (6,144 slots)
  U+D800..U+DFFF                   astral='surrogates' (default): UTF-16 surrogate ids, so a character above
                                   the BMP is two ids (high, low) and decoding stays lossless;
                                   astral='unk': astral characters become <unk> and these 2,048 slots hold
                                   n-grams too (before U+E100..), as in the paper's layout.
Input characters in the private-use range U+E000..U+F8FF would collide with special and n-gram ids; they
encode as <unk> (documented, lossy). Lone surrogates in the input are an error (errors='strict') or <unk>
(errors='replace'). Encoding is greedy longest match (3-gram, then 2-gram, then character); decoding is
lossless for every other string. The n-gram table is saved as JSON next to a model (`save` / `load`).
"""
from __future__ import annotations

import collections
import json
import os
import re
import unicodedata

import numpy as np

VOCAB_SIZE = 65536
SPECIAL_BASE = 0xE000
NUM_SPECIAL = 256
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"<r{i}>" for i in range(4, NUM_SPECIAL)]
PAD, BOS, EOS, UNK = (SPECIAL_BASE + i for i in range(4))
SURROGATES = range(0xD800, 0xE000)
PRIVATE_USE = range(0xE000, 0xF900)
NGRAM_SLOTS = range(0xE100, 0xF900)
ASTRAL_MODES = ("surrogates", "unk")


def is_char_id(i: int) -> bool:
    """True for ids that stand for the character with that code point."""
    return 0 <= i < 0xD800 or 0xF900 <= i < VOCAB_SIZE


def script_of(ch: str) -> str:
    """Coarse script of a letter from its Unicode name ('LATIN', 'CYRILLIC', 'GREEK', 'CJK', ...);
    'COMMON' for digits, punctuation, spaces and symbols."""
    if not unicodedata.category(ch).startswith("L"):
        return "COMMON"
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else "COMMON"


def ngram_script(gram: str) -> str | None:
    """The one script of an n-gram's letters (COMMON if it has none); None if it mixes scripts."""
    scripts = {script_of(c) for c in gram} - {"COMMON"}
    if len(scripts) > 1:
        return None
    return scripts.pop() if scripts else "COMMON"


def _encodable(gram: str) -> bool:
    return all(is_char_id(ord(c)) for c in gram)


def learn_ngrams(docs, per_script: int, max_ngrams: int, max_chars: int = 2_000_000) -> list[str]:
    """Top `per_script` 2- and 3-grams of each script in the first `max_chars` characters of `docs`, most
    frequent first (ties by string), at most `max_ngrams` in all. Deterministic."""
    counts = collections.Counter()
    seen = 0
    for d in docs:
        d = d[:max_chars - seen]
        for n in (2, 3):
            counts.update(d[i:i + n] for i in range(len(d) - n + 1))
        seen += len(d)
        if seen >= max_chars:
            break
    by_script = collections.defaultdict(list)
    for gram, c in counts.items():
        if c < 2 or not _encodable(gram):
            continue
        s = ngram_script(gram)
        if s is not None:
            by_script[s].append((-c, gram))
    chosen = []
    for s in sorted(by_script):
        chosen += sorted(by_script[s])[:per_script]
    return [g for _, g in sorted(chosen)][:max_ngrams]


class UnicodeTokenizer:
    """encode(text) -> np.int32 ids, decode(ids) -> str, vocab_size = 65,536. See the module docstring."""
    vocab_size = VOCAB_SIZE
    name = "unicode"

    def __init__(self, ngrams=(), astral: str = "surrogates"):
        if astral not in ASTRAL_MODES:
            raise ValueError(f"astral={astral!r}; expected one of {ASTRAL_MODES}")
        self.astral = astral
        slots = list(NGRAM_SLOTS) if astral == "surrogates" else list(SURROGATES) + list(NGRAM_SLOTS)
        ngrams = list(ngrams)
        if len(ngrams) > len(slots):
            raise ValueError(f"{len(ngrams)} n-grams do not fit the {len(slots)} n-gram slots (astral={astral!r})")
        for g in ngrams:
            if len(g) not in (2, 3) or not _encodable(g):
                raise ValueError(f"n-gram {g!r} must be 2 or 3 characters with character ids")
        if len(set(ngrams)) != len(ngrams):
            raise ValueError("n-gram table has duplicates")
        self.ngrams = ngrams
        self.ngram_ids = {g: slots[i] for i, g in enumerate(ngrams)}
        self.id_to_ngram = {v: k for k, v in self.ngram_ids.items()}
        # n-gram keys as int64 (c0 << 42 | c1 << 21 | c2) for vectorised lookup
        self._keys = {n: np.array(sorted(_key(g) for g in ngrams if len(g) == n), np.int64) for n in (2, 3)}
        self._key_ids = {n: np.array([self.ngram_ids[_unkey(k, n)] for k in self._keys[n]], np.int32)
                         for n in (2, 3)}
        self._special_re = re.compile("|".join(re.escape(s) for s in SPECIALS[:4]))

    @classmethod
    def train(cls, docs, per_script: int = 256, max_ngrams: int | None = None, astral: str = "surrogates",
              max_chars: int = 2_000_000):
        slots = len(NGRAM_SLOTS) + (len(SURROGATES) if astral == "unk" else 0)
        return cls(learn_ngrams(docs, per_script, min(max_ngrams or slots, slots), max_chars), astral)

    # -- ids of single characters ----------------------------------------------------------------------

    def _char_ids(self, text: str, errors: str) -> np.ndarray:
        """One or two ids per character (astral characters: a surrogate pair or <unk>)."""
        utf16 = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), np.uint16).astype(np.int32)
        is_sur = (utf16 >= 0xD800) & (utf16 < 0xE000)
        high, low = is_sur & (utf16 < 0xDC00), is_sur & (utf16 >= 0xDC00)
        paired_high = high & np.append(low[1:], False)
        paired_low = low & np.insert(paired_high[:-1], 0, False)
        lone = is_sur & ~(paired_high | paired_low)
        if lone.any():
            if errors == "strict":
                pos = int(np.flatnonzero(lone)[0])
                index = len(text.encode("utf-16-le", "surrogatepass")[:2 * pos].decode("utf-16-le", "surrogatepass"))
                raise ValueError(f"text has a lone surrogate U+{utf16[pos]:04X} at character {index}: not a "
                                 "Unicode character; pass errors='replace' to encode it as <unk>")
            utf16 = np.where(lone, UNK, utf16)
        pua = (utf16 >= PRIVATE_USE.start) & (utf16 < PRIVATE_USE.stop)
        ids = np.where(pua, UNK, utf16)
        if self.astral == "unk":
            ids = np.where(paired_high, UNK, ids)[~paired_low]
        return ids

    # -- public API ------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, parse_special: bool = False,
               errors: str = "strict") -> np.ndarray:
        """Ids (np.int32). parse_special: the literal strings <pad>, <s>, </s>, <unk> in text become their
        special ids. errors: 'strict' (lone surrogates raise ValueError) or 'replace' (<unk>)."""
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors={errors!r}; expected 'strict' or 'replace'")
        parts = []
        if parse_special:
            start = 0
            for m in self._special_re.finditer(text):
                parts.append(self._encode_plain(text[start:m.start()], errors))
                parts.append(np.array([SPECIAL_BASE + SPECIALS.index(m.group())], np.int32))
                start = m.end()
            parts.append(self._encode_plain(text[start:], errors))
        else:
            parts.append(self._encode_plain(text, errors))
        if bos:
            parts.insert(0, np.array([BOS], np.int32))
        if eos:
            parts.append(np.array([EOS], np.int32))
        return np.concatenate(parts).astype(np.int32)

    def _encode_plain(self, text: str, errors: str) -> np.ndarray:
        ids = self._char_ids(text, errors)
        n = len(ids)
        if not self.ngrams or n < 2:
            return ids.astype(np.int32)
        # Which positions start a known 3-gram / 2-gram (only character ids take part).
        ok = (ids < 0xD800) | (ids >= 0xF900)
        c = ids.astype(np.int64)
        match = {}
        for k in (2, 3):
            if n < k or not len(self._keys[k]):
                match[k] = np.full(n, -1, np.int64)
                continue
            key = c[:n - k + 1] << 42 | c[1:n - k + 2] << 21 if k == 2 else \
                c[:n - 2] << 42 | c[1:n - 1] << 21 | c[2:]
            valid = np.all([ok[j:n - k + 1 + j] for j in range(k)], axis=0)
            pos = np.minimum(np.searchsorted(self._keys[k], key), len(self._keys[k]) - 1)
            hit = valid & (self._keys[k][pos] == key)
            m = np.full(n, -1, np.int64)
            m[:n - k + 1] = np.where(hit, self._key_ids[k][pos], -1)
            match[k] = m
        m3, m2, base = match[3].tolist(), match[2].tolist(), ids.tolist()
        out, i = [], 0
        while i < n:  # greedy longest match
            if m3[i] >= 0:
                out.append(m3[i])
                i += 3
            elif m2[i] >= 0:
                out.append(m2[i])
                i += 2
            else:
                out.append(base[i])
                i += 1
        return np.asarray(out, np.int32)

    def token_text(self, i: int) -> str:
        """The text an id stands for: its character, its n-gram, its special name, or (surrogate and
        unused ids) a name such as <U+D800> / <unused:E5A0>."""
        i = int(i)
        if is_char_id(i):
            return chr(i)
        if i in self.id_to_ngram:
            return self.id_to_ngram[i]
        if SPECIAL_BASE <= i < SPECIAL_BASE + NUM_SPECIAL:
            return SPECIALS[i - SPECIAL_BASE]
        if i in SURROGATES and self.astral == "surrogates":
            return f"<U+{i:04X}>"
        if 0 <= i < VOCAB_SIZE:
            return f"<unused:{i:04X}>"
        raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ids; specials as their names (or dropped with skip_special). Surrogate pairs become their
        astral character; an unpaired surrogate id or an unused slot becomes U+FFFD."""
        units = []
        for i in np.asarray(ids, np.int64).ravel().tolist():
            if is_char_id(i) or (self.astral == "surrogates" and i in SURROGATES):
                units.append(i)
            elif i in self.id_to_ngram:
                units.extend(ord(c) for c in self.id_to_ngram[i])
            elif SPECIAL_BASE <= i < SPECIAL_BASE + NUM_SPECIAL:
                if not skip_special:
                    units.extend(ord(c) for c in SPECIALS[i - SPECIAL_BASE])
            else:
                units.append(0xFFFD)
        raw = np.asarray(units, np.uint16).tobytes()
        return raw.decode("utf-16-le", "replace")

    def char_lengths(self) -> np.ndarray:
        """Characters each id stands for (V,) int32: 1 for characters and high surrogates (a surrogate
        pair is one character), n for n-grams, 0 for specials and unused slots. For bits per character."""
        out = np.zeros(VOCAB_SIZE, np.int32)
        out[:0xD800] = 1
        out[0xF900:] = 1
        if self.astral == "surrogates":
            out[0xD800:0xDC00] = 1  # a high surrogate stands for the astral character; the low one for none
        for g, i in self.ngram_ids.items():
            out[i] = len(g)
        return out

    # -- persistence -----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": "jaxemb-unicode-tokenizer-1", "astral": self.astral, "ngrams": self.ngrams}

    def save(self, path: str) -> None:
        """Writes the n-gram table atomically (temp file, then rename)."""
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        if spec.get("format") != "jaxemb-unicode-tokenizer-1":
            raise ValueError(f"{path!r} is not a jaxemb Unicode tokenizer file (format {spec.get('format')!r})")
        return cls(spec["ngrams"], spec["astral"])


def _key(g: str) -> int:
    c = [ord(x) for x in g]
    return c[0] << 42 | c[1] << 21 | (c[2] if len(c) == 3 else 0)


def _unkey(k: int, n: int) -> str:
    chars = [k >> 42, (k >> 21) & 0x1FFFFF, k & 0x1FFFFF][:n]
    return "".join(chr(c) for c in chars)

"""Visual Unicode glyph embeddings (Bochkov 2025): render every token, flatten, PCA, L2-normalise.

Pipeline for the tokens `ids` of a UnicodeTokenizer (jaxemb.data.unicode_tokenizer):
  1. render: each character drawn centred in a cell x cell (32 x 32) image, from GNU Unifont's plain-text
     .hex bitmaps (Debian `unifont`: /usr/share/unifont/unifont.hex; scaled 2x) or from any TTF/OTF
     through Pillow (e.g. the DejaVu fonts matplotlib ships). An n-gram is its characters' cells side by
     side, resized to one cell. Special and unused slots are drawn as their literal names ('<pad>',
     '<unused:E5A0>'). A character no font has is drawn as its code point label 'U+0378' (so distinct
     missing characters stay distinct); fonts are tried in the order given, so a second font is a fallback.
     A Pillow font "has" a glyph unless it draws the same ink as its .notdef glyph (a font whose .notdef
     is blank gives blank cells for its missing characters).
  2. optional fixed-seed augmentation per token (small rotation, shift, noise, blur), then binarise at 128;
  3. flatten in polar-snake order: pixels by distance ring from the centre, then by angle, the angular
     direction alternating ring by ring (a snake);
  4. PCA over all rendered tokens (centring + rotation onto the principal axes, float64 covariance), keep
     `dim` components (1024 = all of a 32 x 32 cell), L2-normalise the rows.
`build_glyph_matrix` caches the (n, dim) float32 result under cache_dir (default $JAXEMB_CACHE or
~/.cache/jaxemb/glyphs), keyed by the font files' SHA-256, the tokenizer, the ids and every setting; files
are written to a temp name, then renamed. The full 65,536 x 1024 matrix takes ~20 s on 2 CPU cores.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from jaxemb.data.files import sha256_file
from jaxemb.data.unicode_tokenizer import UnicodeTokenizer, is_char_id

CACHE_VERSION = 1
UNIFONT_PATHS = ("/usr/share/unifont/unifont.hex",)
INSTALL_HINT = ("install GNU Unifont (Debian/Ubuntu: `apt-get install unifont`, which ships "
                "/usr/share/unifont/unifont.hex) or pass any .ttf/.otf file, e.g. matplotlib's "
                "mpl-data/fonts/ttf/DejaVuSans.ttf (`pip install matplotlib`)")


def _blank(cell):
    return np.zeros((cell, cell), np.uint8)


@functools.lru_cache(maxsize=4)
def _read_hex(path: str, size: int, mtime: int):
    """({code point: hex bitmap}, sha256) of a .hex file; memoised by path, size and mtime."""
    rows = {}
    try:
        with open(path, encoding="ascii") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                cp, _, bits = line.partition(":")
                if not bits or len(bits) % 16:
                    raise ValueError(f"line {n}")
                rows[int(cp, 16)] = bits
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"font file {path!r} is not a readable GNU Unifont .hex file ({e}); "
                         f"{INSTALL_HINT}") from None
    if not rows:
        raise ValueError(f"font file {path!r} holds no glyphs; {INSTALL_HINT}")
    return rows, sha256_file(path)


class UnifontHex:
    """GNU Unifont .hex: lines 'XXXX:HEX' with 16 rows of 8 or 16 (or more) pixels per glyph."""

    def __init__(self, path: str, cell: int = 32):
        self.path, self.cell = path, cell
        st = os.stat(path)
        self.rows, self.sha256 = _read_hex(path, st.st_size, st.st_mtime_ns)

    def glyph(self, cp: int):
        """(cell, cell) uint8 0/255 or None if the font has no glyph for cp."""
        bits = self.rows.get(cp)
        if bits is None:
            return None
        width = len(bits) * 4 // 16
        raw = np.frombuffer(bytes.fromhex(bits), np.uint8).reshape(16, width // 8)
        px = np.unpackbits(raw, axis=1).astype(np.uint8) * 255  # (16, width)
        scale = max(self.cell // 16, 1)
        px = np.repeat(np.repeat(px, scale, axis=0), scale, axis=1)
        if px.shape != (self.cell, self.cell) and (px.shape[0] > self.cell or px.shape[1] > self.cell):
            return np.asarray(Image.fromarray(px).resize((self.cell, self.cell), Image.BILINEAR))
        out = _blank(self.cell)
        top, left = (self.cell - px.shape[0]) // 2, (self.cell - px.shape[1]) // 2
        out[top:top + px.shape[0], left:left + px.shape[1]] = px
        return out


class PillowFont:
    """Any TrueType/OpenType font through Pillow; glyphs centred on the advance box and the
    ascender/descender middle (anchor 'mm'), so relative heights (',' vs "'") survive."""

    def __init__(self, path: str, cell: int = 32, size: int | None = None):
        self.path, self.cell = path, cell
        try:
            self.font = ImageFont.truetype(path, size or int(round(cell * 0.8)),
                                           layout_engine=ImageFont.Layout.BASIC)
        except OSError as e:
            raise ValueError(f"font file {path!r} cannot be read as a TrueType/OpenType font ({e}); "
                             f"{INSTALL_HINT}") from None
        self.sha256 = sha256_file(path)
        self._notdef = self._draw(chr(0x10FFFD)).tobytes()  # a private-use character no font maps

    def _draw(self, ch: str) -> np.ndarray:
        img = Image.new("L", (self.cell, self.cell), 0)
        ImageDraw.Draw(img).text((self.cell / 2, self.cell / 2), ch, fill=255, font=self.font, anchor="mm")
        return np.asarray(img)

    def glyph(self, cp: int):
        if 0xD800 <= cp < 0xE000:
            return None
        try:
            px = self._draw(chr(cp))
        except (OSError, RuntimeError, ValueError):
            return None
        if px.tobytes() == self._notdef and px.any():
            return None
        return px


def open_font(path: str, cell: int = 32):
    """UnifontHex for '.hex', PillowFont otherwise. Clear errors for a missing or unreadable file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"font file {path!r} does not exist; {INSTALL_HINT}")
    if path.endswith(".hex"):
        return UnifontHex(path, cell)
    return PillowFont(path, cell)


def default_font_path() -> str:
    """Debian's Unifont if installed, else matplotlib's DejaVu Sans; FileNotFoundError if neither."""
    for p in UNIFONT_PATHS:
        if os.path.exists(p):
            return p
    try:
        import matplotlib
        p = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    raise FileNotFoundError(f"no glyph font found; {INSTALL_HINT}")


# -- rendering ---------------------------------------------------------------------------------------------

class Renderer:
    """Draws token texts with a list of fonts (the first that has a glyph wins) into cell x cell images."""

    def __init__(self, fonts, cell: int = 32):
        self.fonts, self.cell = list(fonts), cell
        if not self.fonts:
            raise ValueError("Renderer needs at least one font")
        self._labels, self._glyphs = {}, {}

    def glyph(self, cp: int):
        """The first font's glyph for cp, or None if no font has one (memoised)."""
        if cp not in self._glyphs:
            self._glyphs[cp] = next((g for f in self.fonts if (g := f.glyph(cp)) is not None), None)
        return self._glyphs[cp]

    def char(self, cp: int) -> np.ndarray:
        g = self.glyph(cp)
        return g if g is not None else self.label(f"U+{cp:04X}")

    def _strip(self, text: str, missing_blank: bool) -> np.ndarray:
        """Cells side by side (a cell whose ink lies in its middle half, such as a Latin letter, keeps only
        that half), resized to one cell."""
        q = self.cell // 4
        cells = []
        for ch in text:
            g = self.glyph(ord(ch))
            g = g if g is not None else (_blank(self.cell) if missing_blank else self.char(ord(ch)))
            narrow = not g[:, :q].any() and not g[:, self.cell - q:].any()
            cells.append(g[:, q:self.cell - q] if narrow else g)
        strip = np.concatenate(cells, axis=1)
        if strip.shape[1] == self.cell:
            return strip
        return np.asarray(Image.fromarray(strip).resize((self.cell, self.cell), Image.BILINEAR))

    def label(self, name: str) -> np.ndarray:
        """A name such as '<pad>' or 'U+0378' drawn as one cell (characters side by side)."""
        if name not in self._labels:
            self._labels[name] = self._strip(name, missing_blank=True)
        return self._labels[name]

    def text(self, text: str) -> np.ndarray:
        """One character: its glyph; several (an n-gram): their cells side by side, resized to one cell."""
        if len(text) == 1:
            return self.char(ord(text))
        return self._strip(text, missing_blank=False)

    def token(self, tokenizer: UnicodeTokenizer, i: int) -> np.ndarray:
        i = int(i)
        if is_char_id(i) or i in tokenizer.id_to_ngram:
            return self.text(tokenizer.token_text(i))
        return self.label(tokenizer.token_text(i))


def augment_cell(px: np.ndarray, rng: np.random.Generator, rotate: float, shift: float, noise: float,
                 blur: float) -> np.ndarray:
    """Small random rotation (degrees), shift (pixels), Gaussian blur (radius) and pixel noise (std in
    [0, 1] units) of a grey cell; returns uint8 before binarisation."""
    img = Image.fromarray(px)
    angle = float(rng.uniform(-rotate, rotate)) if rotate else 0.0
    dx, dy = (float(v) for v in rng.uniform(-shift, shift, 2)) if shift else (0.0, 0.0)
    if angle or dx or dy:
        img = img.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, blur))))
    out = np.asarray(img, np.float32)
    if noise:
        out = out + rng.normal(0.0, noise * 255.0, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def binarise(px: np.ndarray, threshold: int = 128) -> np.ndarray:
    return (px >= threshold).astype(np.uint8)


def polar_snake_order(cell: int = 32) -> np.ndarray:
    """Permutation of the cell*cell pixel indices: by integer distance ring from the cell centre, then by
    angle, counter-clockwise on even rings and clockwise on odd rings; ties by (row, col)."""
    r, c = np.divmod(np.arange(cell * cell), cell)
    y, x = r - (cell - 1) / 2, c - (cell - 1) / 2
    ring = np.floor(np.hypot(y, x)).astype(np.int64)
    angle = np.arctan2(y, x)
    angle = np.where(ring % 2 == 0, angle, -angle)
    return np.lexsort((c, r, angle, ring))


def render_tokens(tokenizer, ids, renderer: Renderer, augment: dict | None = None, seed: int = 0) -> np.ndarray:
    """Binary pixel rows (n, cell*cell) uint8 in polar-snake order, one per token id."""
    order = polar_snake_order(renderer.cell)
    out = np.empty((len(ids), renderer.cell ** 2), np.uint8)
    for row, i in enumerate(np.asarray(ids).tolist()):
        px = renderer.token(tokenizer, i)
        if augment:
            px = augment_cell(px, np.random.default_rng([seed, i]), **augment)
        out[row] = binarise(px).reshape(-1)[order]
    return out


def pca_embed(x: np.ndarray, dim: int | None = None, chunk: int = 8192) -> np.ndarray:
    """PCA of rows x (n, p): centre, rotate onto the principal axes (float64 covariance, eigenvectors by
    decreasing variance, each signed so its largest entry is positive), keep `dim` components, L2-normalise
    rows. Returns float32 (n, dim)."""
    n, p = x.shape
    dim = p if dim is None else dim
    if not 0 < dim <= p:
        raise ValueError(f"PCA dim={dim} must be in [1, {p}] (pixels per cell)")
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((p, p), np.float64)
    for s in range(0, n, chunk):
        xc = x[s:s + chunk].astype(np.float64) - mean
        cov += xc.T @ xc
    vals, vecs = np.linalg.eigh(cov / max(n, 1))
    top = np.argsort(-vals, kind="stable")[:dim]
    vecs = vecs[:, top]
    flip = np.sign(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(dim)])
    vecs = vecs * np.where(flip == 0, 1.0, flip)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        y = (x[s:s + chunk].astype(np.float64) - mean) @ vecs
        out[s:s + chunk] = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return out


# -- the cached builder ------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    return os.environ.get("JAXEMB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxemb", "glyphs"))


def cache_key(tokenizer, ids, fonts, cell, augment, seed, dim) -> str:
    spec = {"version": CACHE_VERSION, "fonts": [f.sha256 for f in fonts], "cell": cell,
            "augment": augment or None, "seed": seed, "dim": dim, "tokenizer": tokenizer.to_json(),
            "ids": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def build_glyph_matrix(tokenizer, ids=None, font_paths=None, cell: int = 32, augment: dict | None = None,
                       seed: int = 0, dim: int | None = None, cache_dir: str | None = None,
                       use_cache: bool = True) -> np.ndarray:
    """Glyph embeddings (len(ids), dim) float32 with unit-norm rows for the token ids (default: all
    65,536). PCA is fitted over exactly these ids. Cached by font hashes + settings (see module doc)."""
    ids = np.arange(tokenizer.vocab_size) if ids is None else np.asarray(ids, np.int64)
    paths = list(font_paths or [default_font_path()])
    fonts = [open_font(p, cell) for p in paths]
    dim = cell * cell if dim is None else dim
    path = None
    if use_cache:
        cache_dir = cache_dir or default_cache_dir()
        path = os.path.join(cache_dir, f"glyphs-{cache_key(tokenizer, ids, fonts, cell, augment, seed, dim)}.npy")
        if os.path.exists(path):
            return np.load(path)
    pixels = render_tokens(tokenizer, ids, Renderer(fonts, cell), augment, seed)
    matrix = pca_embed(pixels, dim)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, matrix)
        os.replace(tmp, path)
    return matrix

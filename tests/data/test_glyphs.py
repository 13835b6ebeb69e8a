import hashlib
import os

import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxemb.data import glyphs
from jaxemb.data.unicode_tokenizer import (BOS, EOS, NGRAM_SLOTS, PAD, SPECIALS, SURROGATES, UNK, VOCAB_SIZE,
                                           UnicodeTokenizer, is_char_id)

UNIFONT = "/usr/share/unifont/unifont.hex"
DEJAVU = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
CORPUS = ["the theory of the thing; then there " * 20, "Съешь же ещё этих мягких булок " * 10,
          "Γαζέες καὶ μυρτιὲς " * 10, "天地玄黃 宇宙洪荒 " * 10, "    return x\n" * 30]
TOK = UnicodeTokenizer.train(CORPUS, per_script=8)
TOK_UNK = UnicodeTokenizer.train(CORPUS, per_script=8, astral="unk")

# any Unicode string without lone surrogates (category Cs) or private-use characters (which become <unk>)
clean_text = st.text(st.characters(exclude_categories=["Cs", "Co"]), max_size=60)


@settings(max_examples=150, deadline=None)
@given(clean_text)
def test_round_trip_any_text_including_astral(s):
    ids = TOK.encode(s)
    assert ids.dtype == np.int32 and ((ids >= 0) & (ids < VOCAB_SIZE)).all()
    assert TOK.decode(ids) == s


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(clean_text, st.sampled_from(SPECIALS[:4])), max_size=6))
def test_round_trip_with_special_tokens(parts):
    s = "".join(parts)
    ids = TOK.encode(s, parse_special=True)
    assert TOK.decode(ids) == s
    wrapped = TOK.encode(s, bos=True, eos=True)
    assert wrapped[0] == BOS and wrapped[-1] == EOS
    assert TOK.decode(wrapped, skip_special=True) == s


def test_specials_and_astral_fallbacks():
    assert TOK.decode([PAD, BOS, EOS, UNK]) == "<pad><s></s><unk>"
    assert TOK.encode("<s>x</s>", parse_special=True).tolist() == [BOS, ord("x"), EOS]
    assert TOK.encode("<s>").tolist() != [BOS]  # literal text unless parse_special
    emoji = TOK.encode("a😀")  # astral: a UTF-16 surrogate pair of ids
    assert emoji.tolist() == [ord("a"), 0xD83D, 0xDE00]
    assert TOK_UNK.encode("a😀b").tolist() == [ord("a"), UNK, ord("b")]
    assert TOK.encode("\ue123").tolist() == [UNK]  # private use collides with special/n-gram ids
    assert TOK.decode([0xD83D, ord("x")]) == "\ufffdx"  # unpaired surrogate id


def test_ngrams_are_learned_per_script_and_never_collide():
    for tok, slots in [(TOK, set(NGRAM_SLOTS)), (TOK_UNK, set(SURROGATES) | set(NGRAM_SLOTS))]:
        ids = list(tok.ngram_ids.values())
        assert len(set(ids)) == len(ids) and set(ids) <= slots
        assert not any(is_char_id(i) for i in ids)
        assert not any(0xE000 <= i < 0xE100 for i in ids)
    assert "th" in TOK.ngram_ids and "he" in TOK.ngram_ids and " ещ" in TOK.ngram_ids and "天地玄" in TOK.ngram_ids
    assert not any(g == "e ж" for g in TOK.ngrams)
    assert TOK.encode("the").tolist() == [TOK.ngram_ids["the"]]  # greedy longest match
    assert min(TOK_UNK.ngram_ids.values()) == 0xD800  # the paper's layout: surrogate range first


def test_tokenizer_save_load(tmp_path):
    path = str(tmp_path / "tok.json")
    TOK.save(path)
    again = UnicodeTokenizer.load(path)
    assert again.ngram_ids == TOK.ngram_ids and again.astral == TOK.astral
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))


def test_lone_surrogate_is_a_clear_error_or_unk():
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at character 2"):
        TOK.encode("ab\ud800c")
    assert TOK.encode("ab\udc00c", errors="replace").tolist() == [ord("a"), ord("b"), UNK, ord("c")]


def test_char_lengths():
    lengths = TOK.char_lengths()
    assert lengths[ord("a")] == 1 and lengths[TOK.ngram_ids["the"]] == 3 and lengths[BOS] == 0
    ids = TOK.encode("the cat 😀")
    assert lengths[ids].sum() == len("the cat 😀")


# -- rendering -------------------------------------------------------------------------------------------

IDS = np.array([ord(c) for c in "O0lI1|oAж中"] + [TOK.ngram_ids["th"], TOK.ngram_ids["the"], PAD, UNK, 0xD83D,
                                                  0xFFFF, NGRAM_SLOTS.stop - 1])


@pytest.mark.parametrize("font", [pytest.param(UNIFONT, marks=pytest.mark.requires_unifont), DEJAVU])
def test_rendering_is_deterministic_and_binary(font):
    a = glyphs.render_tokens(TOK, IDS, glyphs.Renderer([glyphs.open_font(font)]))
    b = glyphs.render_tokens(TOK, IDS, glyphs.Renderer([glyphs.open_font(font)]))
    assert a.shape == (len(IDS), 1024) and set(np.unique(a)) <= {0, 1}
    assert hashlib.sha256(a.tobytes()).hexdigest() == hashlib.sha256(b.tobytes()).hexdigest()
    assert (a.sum(axis=1)[:-1] > 0).all()  # every token draws ink (a space would not)
    aug = dict(rotate=5.0, shift=1.0, noise=0.05, blur=0.5)
    r = glyphs.Renderer([glyphs.open_font(font)])
    x, y = (glyphs.render_tokens(TOK, IDS, r, aug, seed=3) for _ in range(2))
    assert np.array_equal(x, y) and not np.array_equal(x, a)


@pytest.mark.requires_unifont
def test_unifont_glyph_is_centred_2x():
    cell = glyphs.open_font(UNIFONT).glyph(ord("A"))
    cols = np.flatnonzero(cell.any(axis=0))
    assert cell.shape == (32, 32) and cols.min() >= 8 and cols.max() < 24  # half-width glyph in the middle


def test_polar_snake_is_a_permutation_starting_at_the_centre():
    order = glyphs.polar_snake_order(32)
    assert sorted(order.tolist()) == list(range(1024))
    r, c = np.divmod(order[:4], 32)
    assert set(zip(r.tolist(), c.tolist())) == {(15, 15), (15, 16), (16, 15), (16, 16)}
    dist = np.hypot(*(np.divmod(order, 32) - np.array([[15.5], [15.5]])))
    assert (np.diff(np.floor(dist)) >= 0).all()  # rings from the inside out


def test_pca_matches_float64_reference_and_rows_are_unit_norm():
    rng = np.random.default_rng(0)
    x = (rng.random((300, 64)) < 0.3).astype(np.uint8)
    got = glyphs.pca_embed(x, 16, chunk=128)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    xc = x.astype(np.float64) - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:16].T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    signs = np.sign((got * ref).sum(axis=0))  # each component up to its sign
    np.testing.assert_allclose(got, ref * signs, atol=2e-5)
    full = glyphs.pca_embed(x)
    assert full.shape == (300, 64)
    # all components: a rotation of the centred data, so cosine similarities are those of the pixels
    cos = xc @ xc.T / np.outer(np.linalg.norm(xc, axis=1), np.linalg.norm(xc, axis=1))
    np.testing.assert_allclose(full @ full.T, cos, atol=2e-5)


@pytest.mark.requires_unifont
def test_build_caches_by_font_and_settings(tmp_path):
    ids = IDS[:10]
    a = glyphs.build_glyph_matrix(TOK, ids, [UNIFONT], cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert a.shape == (10, 1024) and len(files) == 1 and files[0].endswith(".npy")
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    b = glyphs.build_glyph_matrix(TOK, ids, [UNIFONT], cache_dir=str(tmp_path))
    assert np.array_equal(a, b) and os.listdir(tmp_path) == files
    glyphs.build_glyph_matrix(TOK, ids, [DEJAVU], cache_dir=str(tmp_path))
    glyphs.build_glyph_matrix(TOK, ids, [UNIFONT], dim=8, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 3 and not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_missing_and_unreadable_fonts(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install unifont"):
        glyphs.open_font(str(tmp_path / "nope.ttf"))
    bad = tmp_path / "bad.ttf"
    bad.write_bytes(b"not a font")
    with pytest.raises(ValueError, match=r"bad.ttf.*cannot be read"):
        glyphs.open_font(str(bad))
    bad_hex = tmp_path / "bad.hex"
    bad_hex.write_text("0041:XYZ\n")
    with pytest.raises(ValueError, match="not a readable GNU Unifont"):
        glyphs.open_font(str(bad_hex))


@pytest.mark.requires_unifont
def test_font_without_a_glyph_uses_the_fallback_font_then_a_code_point_label():
    dejavu, unifont = glyphs.open_font(DEJAVU), glyphs.open_font(UNIFONT)
    cjk = ord("中")
    assert dejavu.glyph(cjk) is None and dejavu.glyph(ord(" ")) is not None
    only = glyphs.Renderer([dejavu])
    assert np.array_equal(only.char(cjk), only.label("U+4E2D"))  # documented: drawn as its code point
    both = glyphs.Renderer([dejavu, unifont])
    assert np.array_equal(both.char(cjk), unifont.glyph(cjk))  # a second font is the fallback
    assert np.array_equal(both.char(ord("A")), dejavu.glyph(ord("A")))
    assert unifont.glyph(0xFFFF) is None  # a noncharacter: not in unifont.hex
    r = glyphs.Renderer([unifont])
    assert np.array_equal(r.char(0xFFFF), r.label("U+FFFF")) and r.char(0xFFFF).any()

import hashlib
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxemb.data import text


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(s):
    tok = text.ByteTokenizer()
    ids = tok.encode(s)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert tok.decode(ids) == s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(2, 17))
def test_pack_keeps_every_token_and_never_predicts_across_documents(lengths, seq_len):
    docs = [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]  # token value = doc number
    packed = text.pack(docs, seq_len)
    tok, seg = packed["tokens"], packed["segments"]
    assert tok.shape[1] == seq_len + 1
    real = seg > 0
    assert real.sum() == sum(lengths)
    np.testing.assert_array_equal(tok[real], np.concatenate(docs))
    b = text.lm_batch(tok, seg)
    w = b["weights"] > 0
    assert (b["inputs"][w] == b["targets"][w]).all()  # a weighted pair is always inside one document
    same = (b["inputs"] == b["targets"]) & (b["segment_ids"] > 0)
    assert w.sum() == same.sum() or (w <= same).all()
    for row in seg:  # segments increase by one at each boundary, starting at 1
        nz = row[row > 0]
        assert nz[0] == 1 and set(np.diff(nz)) <= {0, 1}


def test_split_is_deterministic_and_order_free():
    docs = [f"document {i}\n" * 3 for i in range(200)]
    tr1, va1 = text.split_docs(docs, 0.1, seed=0)
    tr2, va2 = text.split_docs(list(reversed(docs)), 0.1, seed=0)
    assert set(va1) == set(va2) and set(tr1) == set(tr2)
    assert 5 <= len(va1) <= 40 and not set(va1) & set(tr1)
    _, va3 = text.split_docs(docs, 0.1, seed=1)
    assert set(va3) != set(va1)


def test_packed_source_is_deterministic_and_covers_an_epoch():
    packed = text.pack([np.arange(1000, dtype=np.int32)], 9)
    src = text.PackedSource(packed, 10, seed=4)
    a, b = src.get(3), src.get(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    part = src.get(3, slice(2, 6))
    np.testing.assert_array_equal(part["inputs"], a["inputs"][2:6])
    firsts = np.concatenate([src.get(i)["inputs"][:, 0] for i in range(src.num_batches)])
    assert len(set(firsts.tolist())) == len(firsts)  # no row twice within an epoch


def test_contiguous_rows_stay_inside_documents():
    docs = [np.arange(25, dtype=np.int32), np.arange(100, 140, dtype=np.int32)]
    rows = text.contiguous_rows(docs, 9, 100)
    assert rows.shape == (2 + 4, 10)
    assert (np.diff(rows, axis=1) == 1).all()


def test_embedded_corpora_are_real_text():
    code = text.load_corpus("stdlib", max_chars=200_000)
    prose = text.load_corpus("pydoc")
    assert sum(map(len, code)) >= 200_000 and any("def " in d for d in code)
    assert len(prose) > 50 and any("statement" in d for d in prose)


def test_directory_and_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second doc\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert text.load_corpus(str(tmp_path)) == ["hello world\n", "second doc\n"]
    assert text.load_corpus(str(tmp_path / "a.txt")) == ["hello world\n"]


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        text.load_corpus(str(tmp_path / "empty.txt"))
    d = tmp_path / "nothing"
    d.mkdir()
    (d / "x.bin").write_bytes(b"\x00\xff" * 10)
    with pytest.raises(ValueError, match="holds no non-empty text files"):
        text.load_corpus(str(d))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="sequence length must be >= 2"):
        text.pack([np.arange(10)], 1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        text.PackedSource(text.pack([np.arange(10)], 4), 8)


def test_shakespeare_from_shared_data():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "text", "tinyshakespeare.txt")
    docs = text.chunk_docs(text.load_corpus(path))
    assert len(docs) > 40 and "".join(docs) == open(path).read()


def test_sentencepiece_trained_locally_is_lossless(tmp_path):
    docs = text.load_corpus("pydoc")
    tok = text.SentencePieceTokenizer.train(docs, 600, str(tmp_path / "spm.model"))
    assert tok.vocab_size == 600
    s = "Lexinvariant models — naïve test ✓ 123"
    assert tok.decode(tok.encode(s)) == s
    assert os.path.exists(tmp_path / "spm.model")


def test_tfds_source_prepared_offline(tmp_path):
    import tensorflow_datasets as tfds

    class LocalTextDocs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"text": f"local document number {i}\n"}

    docs = text.load_corpus("tfds:local_text_docs:train", tfds_data_dir=str(tmp_path))
    assert sorted(docs) == sorted(f"local document number {i}\n" for i in range(5))


def _lines(n_chars, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    out = ""
    while len(out) < n_chars:
        out += " ".join(rng.choice(words, rng.integers(1, 12))) + "\n"
    return out[:n_chars]


@pytest.mark.parametrize("n_chars", [2, 40, 700, 3000, 8000, 16000])
def test_one_small_file_splits_by_characters_and_packs(tmp_path, n_chars):
    body = _lines(n_chars, n_chars)
    (tmp_path / "small.txt").write_text(body)
    docs = text.chunk_docs(text.load_corpus(str(tmp_path / "small.txt")))
    assert len(docs) == 1
    for seed in range(4):
        train, valid = text.split_docs(docs, 0.05, seed)
        assert len(train) == len(valid) == 1 and train[0] and valid[0]
        assert train[0] + valid[0] == body
        assert len(train[0]) >= n_chars / 2
        if n_chars >= 700:  # about the asked fraction, starting at a line
            assert 0.04 * n_chars <= len(valid[0]) <= 0.5 * n_chars and train[0].endswith("\n")
        tok = text.ByteTokenizer()
        for part in (train, valid):
            assert text.pack([tok.encode(d) for d in part], 4)["tokens"].shape[1] == 5
    if n_chars >= 8000:  # the tiny study's batch (8 rows of 33 tokens) fits in both parts
        for part in (train, valid):
            text.PackedSource(text.pack([tok.encode(d) for d in part], 32), 8)


def _valid_key(doc, seed):
    h = hashlib.sha256(f"{seed}:".encode() + doc.encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64


def test_every_document_hashed_to_valid_still_leaves_one_to_train():
    docs = ["first document\n", "second document\n", "third one\n"]
    seed = next(s for s in range(1000) if all(_valid_key(d, s) < 0.5 for d in docs[:2]))
    train, valid = text.split_docs(docs[:2], 0.5, seed)
    assert len(train) == len(valid) == 1 and set(train + valid) == set(docs[:2])
    assert train == [max(docs[:2], key=lambda d: _valid_key(d, seed))]  # the one nearest to train
    assert text.split_docs(docs[1::-1], 0.5, seed) == (train, valid)  # order-free


def test_split_of_many_documents_is_the_plain_hash_split():
    docs = [f"document {i}\n" * 3 for i in range(300)]
    for seed in range(3):
        train, valid = text.split_docs(docs, 0.05, seed)
        assert valid == [d for d in docs if _valid_key(d, seed) < 0.05]
        assert train == [d for d in docs if _valid_key(d, seed) >= 0.05]


def test_split_and_pack_errors_are_clear():
    with pytest.raises(ValueError, match="one document of 1 character"):
        text.split_docs(["x"], 0.05)
    with pytest.raises(ValueError, match="valid_fraction=1.0: expected a number in"):
        text.split_docs(["a", "b"], 1.0)
    with pytest.raises(ValueError, match="no documents to split"):
        text.split_docs([], 0.05)
    assert text.split_docs(["only"], 0.0) == (["only"], [])
    with pytest.raises(ValueError, match="nothing to pack: 0 documents"):
        text.pack([], 8)
    with pytest.raises(ValueError, match="nothing to pack: 2 documents"):
        text.pack([np.zeros(0, np.int32)] * 2, 8)


def test_latin1_file_beside_utf8_is_read_with_a_warning(tmp_path):
    (tmp_path / "a.txt").write_text("naïve café\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("déjà vu, señor\n".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"1 of 2 text files are not UTF-8 and were read as Latin-1: b\.txt"):
        docs = text.load_corpus(str(tmp_path))
    assert docs == ["naïve café\n", "déjà vu, señor\n"]
    with pytest.warns(UserWarning, match="1 of 1 text files are not UTF-8"):
        assert text.load_corpus(str(tmp_path / "b.txt")) == ["déjà vu, señor\n"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a UTF-8 file gives no warning
        assert text.load_corpus(str(tmp_path / "a.txt")) == ["naïve café\n"]


def test_many_latin1_files_are_counted_and_named(tmp_path):
    for i in range(7):
        (tmp_path / f"l{i}.txt").write_bytes(f"fichier {i} \xe9t\xe9\n".encode("latin-1"))
    (tmp_path / "u.txt").write_text("utf-8 text\n")
    with pytest.warns(UserWarning, match=r"7 of 8 text files .*: l0\.txt, l1\.txt, l2\.txt, l3\.txt, "
                                         r"l4\.txt and 2 more"):
        assert len(text.load_corpus(str(tmp_path))) == 8


def test_utf8_bom_is_dropped_and_a_binary_file_is_named(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert text.load_corpus(str(tmp_path / "bom.txt")) == ["hello\n"]
    (tmp_path / "x.bin").write_bytes(b"ab\x00cd")
    with pytest.raises(ValueError, match="x.bin' is binary, not text"):
        text.load_corpus(str(tmp_path / "x.bin"))

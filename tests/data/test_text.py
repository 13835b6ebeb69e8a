import os

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
    firsts = np.concatenate([src.get(i)["inputs"][:, 0] for i in range(src.batches_per_epoch)])
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
    with pytest.raises(ValueError, match="holds no non-empty UTF-8 text files"):
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

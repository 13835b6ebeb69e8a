import numpy as np
import pytest

from jaxemb.data import proteins as P


def test_framing_padding_and_special_tokens():
    t = P.tokenize(["MKT<mask>A", "AC"])
    np.testing.assert_array_equal(t.ids, [[0, 20, 15, 11, 32, 5, 2], [0, 5, 23, 2, 1, 1, 1]])
    np.testing.assert_array_equal(t.attention_mask, [[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    assert t.ids.dtype == np.int32 and (t.unknown, t.truncated) == (0, 0)
    assert P.tokenize(["AC"], pad_to=6).ids.shape == (1, 6)
    assert len(P.ALPHABET) == 33 and P.ALPHABET.index("<mask>") == P.MASK == 32


def test_unknown_residues_become_unk_and_are_counted():
    t = P.tokenize(["MJa K", "XBUZO.-"])
    np.testing.assert_array_equal(t.ids[0], [0, 20, 3, 3, 3, 15, 2, 1, 1])  # J, lowercase a, space -> <unk>
    assert t.unknown == 3
    assert list(t.ids[1, 1:8]) == [24, 25, 26, 27, 28, 29, 30]  # the non-standard letters are in the alphabet


def test_over_length_is_truncated_keeping_eos_and_counted():
    t = P.tokenize(["ACDEFGHIK", "AC"], max_length=6)
    np.testing.assert_array_equal(t.ids, [[0, 5, 23, 13, 9, 2], [0, 5, 23, 2, 1, 1]])
    assert t.truncated == 1


@pytest.mark.parametrize("seqs, match", [(["AC", ""], "sequence 1 is ''"), ([None], "sequence 0 is None"),
                                         ([], "no sequences"), ("ACD", "a list of sequences")])
def test_bad_input_is_a_clear_error(seqs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        P.tokenize(seqs)
    with pytest.raises(ValueError, match="pad_to=2"):
        P.tokenize(["ACD"], pad_to=2)
    with pytest.raises(ValueError, match="max_length=2"):
        P.tokenize(["ACD"], max_length=2)


@pytest.mark.requires_transformers
def test_matches_the_hf_esm_alphabet_and_tokenizer(tmp_path):
    from transformers import EsmTokenizer
    from transformers.models.esm.configuration_esm import get_default_vocab_list
    assert tuple(get_default_vocab_list()) == P.ALPHABET
    (tmp_path / "vocab.txt").write_text("\n".join(P.ALPHABET))
    hf = EsmTokenizer(str(tmp_path / "vocab.txt"))
    seqs = ["MKTAYIAKQR<mask>ISFV", "GS<mask><mask>HM", "XBUZO"]
    want = hf(seqs, padding=True)
    t = P.tokenize(seqs)
    np.testing.assert_array_equal(t.ids, want["input_ids"])
    np.testing.assert_array_equal(t.attention_mask, want["attention_mask"])

import numpy as np
from hypothesis import given, settings, strategies as st

from jaxemb.data import synthetic
from jaxemb.data.text import ByteTokenizer


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(1, 8))
def test_lookup_answer_is_the_value_of_the_queried_key(seed, pairs):
    prompt, answer = synthetic.lookup(np.random.default_rng(seed), pairs)
    *items, query = prompt.split(" ")
    table = dict(item.split("->") for item in items)
    assert len(table) == pairs  # keys are distinct
    assert query.endswith("->") and table[query[:-2]] == answer


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(2, 6), st.integers(1, 3))
def test_permutation_answer_applies_the_shown_pattern(seed, width, examples):
    picks = max(1, width - 1)
    prompt, answer = synthetic.permutation(np.random.default_rng(seed), width, picks, examples)
    chunks = prompt.split("->")
    first_in = chunks[0].split(" ")
    first_out = chunks[1].split(" ")[:picks]
    pattern = [first_in.index(s) for s in first_out]  # inputs are distinct symbols
    query = chunks[-2].split(" ")[-width:]
    assert answer == " ".join(query[i] for i in pattern)


def test_frequency_weights_follow_the_text():
    w = synthetic.frequency_weights("aaaab", "ab")
    np.testing.assert_allclose(w, [5 / 7, 2 / 7])
    ex = synthetic.make_examples("lookup", 400, 0, weights=synthetic.frequency_weights("A" * 1000 + "B", "AB" + "C" * 0),
                                 symbols="AB", num_pairs=1)
    values = [a for _, a in ex]
    assert values.count("A") > 300


def test_encode_marks_only_answer_targets():
    ex = [("A->2 C->", "4"), ("x y z->z x q r s->", "s q")]
    b = synthetic.encode_examples(ex, ByteTokenizer())
    tok = ByteTokenizer()
    for i, (p, a) in enumerate(ex):
        got = tok.decode(b["targets"][i][b["weights"][i] > 0])
        assert got == a
        width = b["inputs"].shape[1]
        assert b["segment_ids"][i].sum() == min(len(p) + len(a), width)

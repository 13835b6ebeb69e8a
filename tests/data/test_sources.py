"""The generic sources give exactly the batches of the per-system classes they replaced (same order, same
rows), keep the last partial evaluation batch with weight-0 padding, and split rows across processes."""
import numpy as np
import pytest

from jaxemb.data import kg, text
from jaxemb.data.sources import ArraySource, MappedSource, epoch_order


def _old_packed(packed, b, seed, index, shuffle=True):  # the PackedSource of before
    n = len(packed["tokens"])
    epoch, i = divmod(index, n // b)
    perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    idx = perm[i * b:(i + 1) * b]
    return text.lm_batch(packed["tokens"][idx], packed["segments"][idx])


def _old_kg_train(triples, b, seed, index):  # the TrainSource of before
    epoch, i = divmod(index, -(-len(triples) // b))
    idx = np.random.default_rng([seed, epoch]).permutation(len(triples))[i * b:(i + 1) * b]
    full = np.zeros((b, 3), np.int32)
    full[:len(idx)] = triples[idx]
    return {"head": full[:, 0], "rel": full[:, 1], "tail": full[:, 2],
            "weights": (np.arange(b) < len(idx)).astype(np.float32)}


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packed_and_kg_sources_give_the_batches_of_before():
    rng = np.random.default_rng(0)
    packed = text.pack([rng.integers(0, 50, rng.integers(5, 90)) for _ in range(40)], 7)
    src, valid = text.PackedSource(packed, 6, seed=3), text.PackedSource(packed, 6, seed=3, shuffle=False)
    assert src.num_batches == len(packed["tokens"]) // 6
    for i in range(2 * src.num_batches + 1):  # across an epoch boundary
        _same(src.get(i), _old_packed(packed, 6, 3, i))
    _same(valid.get(1), _old_packed(packed, 6, 3, 1, shuffle=False))
    triples = rng.integers(0, 30, (23, 3)).astype(np.int32)
    ks = kg.TrainSource(triples, 5, seed=2)
    assert ks.num_batches == 5
    for i in range(11):
        _same(ks.get(i), _old_kg_train(triples, 5, 2, i))


def test_evaluation_sources_keep_the_last_partial_batch_with_zero_weights():
    rows = np.arange(5 * 9, dtype=np.int32).reshape(5, 9)
    src = text.RowsSource(rows, 2)
    assert (src.num_batches, src.num_rows) == (3, 5)
    last = src.get(2)
    np.testing.assert_array_equal(last["inputs"][0], rows[4, :-1])
    assert last["weights"][0].all() and not last["weights"][1].any()
    total = sum(src.get(i)["weights"].sum() for i in range(3))
    assert total == 5 * 8  # every real target once, the padding never
    ex = ArraySource({"x": np.arange(7.0)}, 3)
    assert ex.get(2)["weights"].tolist() == [1, 0, 0] and ex.get(2)["x"].tolist() == [6, 0, 0]


def test_rows_split_processes_and_mapped_sources_see_global_row_ids():
    src = ArraySource({"x": np.arange(20)}, 8, seed=1, shuffle=True)
    whole = src.get(3)["x"]
    np.testing.assert_array_equal(np.concatenate([src.get(3, slice(0, 4))["x"], src.get(3, slice(4, 8))["x"]]), whole)
    np.testing.assert_array_equal(whole, epoch_order(1, 1, 20)[:8])  # batch 3 = batch 0 of epoch 1 (3 per epoch)
    mapped = MappedSource(src, lambda b, index, ids: dict(b, ids=ids + 100 * index))
    assert mapped.get(3, slice(4, 8))["ids"].tolist() == [304, 305, 306, 307]


def test_too_few_rows_and_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="3 packed rows are fewer than one batch of 4"):
        text.PackedSource(text.pack([np.arange(24)], 7), 4)
    with pytest.raises(ValueError, match="share one leading length"):
        ArraySource({"a": np.zeros(3), "b": np.zeros(4)}, 2)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        ArraySource({"a": np.zeros(3)}, 0)

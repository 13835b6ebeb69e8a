import numpy as np
import pytest

from jaxemb.data.sources import ArraySource, BucketSource, bucket_widths

PAD = 7


def rows(rng, n, width):
    lengths = rng.integers(1, width + 1, n)
    tokens = np.full((n, width), PAD, np.int32)
    for i, k in enumerate(lengths):
        tokens[i, :k] = rng.integers(0, PAD, k)
    return {"tokens": tokens, "id": np.arange(n), "y": rng.normal(size=n).astype(np.float32)}, lengths


def test_bucket_widths_are_the_quantum_ladder_capped_at_the_full_width():
    assert bucket_widths(100, 16).tolist() == [16, 32, 48, 64, 96, 100]
    assert bucket_widths(16, 16).tolist() == [16] and bucket_widths(5, 16).tolist() == [5]
    w = bucket_widths(2000, 64)
    assert w[-1] == 2000 and (np.diff(w) > 0).all() and (w[:-1] % 64 == 0).all() and len(w) <= 12


def test_an_evaluation_pass_holds_every_row_once_cut_to_its_bucket_with_nothing_cut_off():
    rng = np.random.default_rng()
    arrays, lengths = rows(rng, int(rng.integers(30, 60)), 70)
    src = BucketSource(arrays, lengths, 8, ["tokens"], quantum=8)
    seen, widths = [], set()
    for i in range(src.num_batches):
        b = src.get(i)
        real = b["weights"] > 0
        ids = b["id"][real]
        w = b["tokens"].shape[1]
        widths.add(w)
        assert w in bucket_widths(70, 8) and w >= lengths[ids].max()
        assert w == bucket_widths(70, 8)[np.searchsorted(bucket_widths(70, 8), lengths[ids].max())]
        np.testing.assert_array_equal(b["tokens"][real], arrays["tokens"][ids, :w])
        assert (arrays["tokens"][ids, w:] == PAD).all()  # only padding was cut
        assert (b["weights"][~real] == 0).all() and (b["id"][~real] == 0).all()
        seen += ids.tolist()
    assert sorted(seen) == list(range(src.num_rows)) and len(widths) > 1
    assert src.row_order(0).tolist() == seen
    # per-row outputs of the pass map back to row order
    out = np.concatenate([src.get(i)["y"] for i in range(src.num_batches)])[:src.num_rows]
    back = np.empty_like(out)
    back[src.row_order(0)] = out
    np.testing.assert_array_equal(back, arrays["y"])


def test_training_passes_shuffle_batches_and_dropped_rows_per_epoch_and_resume_exactly():
    rng = np.random.default_rng()
    arrays, lengths = rows(rng, 45, 40)
    make = lambda: BucketSource(arrays, lengths, 8, ["tokens"], seed=3, shuffle=True, drop_last=True, quantum=8)
    src = make()
    assert src.num_batches == 5
    epochs = [[src.get(e * 5 + i)["id"].tolist() for i in range(5)] for e in range(3)]
    for e in epochs:
        flat = sum(e, [])
        assert len(set(flat)) == 40 and all(len(b) == 8 for b in e)
    assert epochs[0] != epochs[1] and set(sum(epochs[0], [])) != set(sum(epochs[1], []))
    again = make()  # a resumed run: batch i is the same data
    assert [again.get(7)["id"].tolist(), again.get(2)["id"].tolist()] == [epochs[1][2], epochs[0][2]]
    spans = [np.ptp(lengths[b]) for b in epochs[0]]
    assert sum(spans) < 2 * np.ptp(lengths)  # sorted by length: similar lengths in a batch


def test_the_full_width_is_kept_when_the_longest_row_needs_it_and_other_sources_still_match():
    arrays, lengths = rows(np.random.default_rng(1), 16, 20)
    lengths[:] = 20
    b = BucketSource(arrays, lengths, 16, ["tokens"]).get(0)
    full = ArraySource(arrays, 16).get(0)
    assert b["tokens"].shape == (16, 20)
    order = np.argsort(lengths, kind="stable")
    np.testing.assert_array_equal(b["tokens"], full["tokens"][order])


def test_bad_bucket_sources_are_named():
    arrays, lengths = rows(np.random.default_rng(2), 10, 12)
    with pytest.raises(ValueError, match=r"lengths has shape \(9,\); expected \(10,\)"):
        BucketSource(arrays, lengths[:9], 4, ["tokens"])
    with pytest.raises(ValueError, match=r"cut=\['toks'\]"):
        BucketSource(arrays, lengths, 4, ["toks"])
    with pytest.raises(ValueError, match=r"cut=\['id'\]"):
        BucketSource(arrays, lengths, 4, ["id"])
    with pytest.raises(ValueError, match=r"expected \[0, 12\]"):
        BucketSource(arrays, lengths + 12, 4, ["tokens"])
    with pytest.raises(ValueError, match="quantum=0"):
        BucketSource(arrays, lengths, 4, ["tokens"], quantum=0)

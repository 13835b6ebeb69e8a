"""benchmarks/ppi_heads.py at a tiny shape: the jaxemb heads (HP on chain rows and packed rows, PAD; with and
without ConvBERT) give the PyTorch peer's predictions on the same weights, and measure() rows are
well-formed (no timing asserted)."""
import math

import numpy as np
import pytest

pytestmark = pytest.mark.requires_transformers

TINY = dict(d=32, batch=2, side_min=9, side_max=20)


@pytest.mark.parametrize("convbert", [False, True])
def test_jax_heads_match_the_torch_peer(convbert):
    from benchmarks import ppi_heads as B
    bench = B.Bench(B.Case(**TINY, convbert=convbert, seed=int(np.random.default_rng().integers(1 << 20))))
    out = bench.outputs()
    assert set(out) == set(B.JAX_STEPS) | set(B.TORCH_STEPS)
    for name, pred in out.items():
        assert pred.shape == (2,) and np.all(np.isfinite(pred)), name
    for name, ref in (("hp_rows", "hp_loop"), ("hp_packed", "hp_loop"), ("pad", "pad_loop")):
        np.testing.assert_allclose(out[name], out[ref], rtol=1e-4, atol=1e-5, err_msg=name)
    if not convbert:  # the batched HF ConvBERT reads pad positions; without it the batched peer agrees too
        for name in ("hp_batched", "pad_batched"):
            np.testing.assert_allclose(out[name], out[name.split("_")[0] + "_loop"], rtol=1e-4, atol=1e-5)
    assert np.abs(out["hp_loop"] - out["pad_loop"]).max() > 1e-6  # two different heads, not one output twice


def test_layouts_hold_the_same_chains():
    from benchmarks import ppi_heads as B
    case = B.Case(**TINY)
    data = B.layouts(case)
    rows, packed, pad = data["hp_rows"], data["hp_packed"], data["pad"]
    for i, cs in enumerate(data["chains"]):
        nl = data["n_lig"][i]
        assert nl + data["n_rec"][i] == len(cs) and 2 <= nl <= 4
        assert sum(rows["chain_len"][i] > 0) == len(cs)
        joined = np.concatenate(cs)
        np.testing.assert_array_equal(packed["packed"][i, packed["packed_seg"][i] > 0], joined)
        np.testing.assert_array_equal(pad["lig"][i, :pad["lig_len"][i]], np.concatenate(cs[:nl]))
        np.testing.assert_array_equal(pad["rec"][i, :pad["rec_len"][i]], np.concatenate(cs[nl:]))
        assert 9 <= pad["lig_len"][i] <= 20 and 9 <= pad["rec_len"][i] <= 20
    assert B.tokens(data) == sum(len(c) for cs in data["chains"] for c in cs)


def test_measure_rows_are_well_formed():
    from benchmarks import ppi_heads as B
    bench = B.Bench(B.Case(**TINY))
    rows = B.measure(bench, reps=1)
    assert [r["step"] for r in rows] == [*B.JAX_STEPS, *B.TORCH_STEPS]
    for r in rows:
        assert (r["d"], r["batch"], r["convbert"], r["reps"]) == (32, 2, False, 1)
        assert r["framework"] == ("jax" if r["step"] in B.JAX_STEPS else "torch")
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0
        assert r["max_abs_diff"] < 1e-4
        assert r["tokens"] == B.tokens(bench.data)
    table = B.speed_table(rows)
    assert table.count("\n") == 4 and "| 32 | no | HP, packed rows | 2 (" in table


def test_bad_flags_are_named():
    from benchmarks import ppi_heads as B
    with pytest.raises(ValueError, match="--dims"):
        B.main(["--dims", "30"])
    with pytest.raises(ValueError, match="--side-min"):
        B.main(["--side-min", "600"])
    with pytest.raises(ValueError, match="reps=0"):
        B.measure(None, 0)

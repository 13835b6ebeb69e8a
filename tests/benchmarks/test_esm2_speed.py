"""benchmarks/esm2_speed.py at a tiny shape: jaxemb and HF EsmModel run the same weights (outputs, loss and
embedding gradient agree), and the rows measure() returns are well-formed (no timing asserted)."""
import math
import os

import numpy as np
import pytest

from helpers import close_to_reference

pytestmark = pytest.mark.requires_transformers

TINY = dict(name="tiny", layers=2, d=32, heads=4, mlp=64, batch=2, seq=12)


def test_tiny_pair_agrees_and_rows_are_well_formed():
    from benchmarks import esm2_speed as B
    pair = B.Pair(B.Shape(**TINY), seed=3, torch_threads=(os.cpu_count(), 1))
    out = pair.outputs()
    close_to_reference(*out["last_hidden_state"])
    close_to_reference(*out["grad_embedding"])
    np.testing.assert_allclose(*out["loss"], rtol=1e-5)
    assert np.abs(out["grad_embedding"][1]).max() > 0  # the backward really ran

    rows = B.measure(pair, reps=1)
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    threads = list(dict.fromkeys((os.cpu_count(), 1)))
    for r in rows:
        assert (r["layers"], r["d"], r["batch"], r["seq"], r["reps"]) == (2, 32, 2, 12, 1)
        assert r["params"] == sum(p.numel() for p in pair.model.parameters())
        assert list(r["torch_tok_s_by_threads"]) == threads
        for v in (r["jax_tok_s"], r["torch_tok_s"], *r["torch_tok_s_by_threads"].values()):
            assert math.isfinite(v) and v > 0
        assert r["torch_tok_s"] == max(r["torch_tok_s_by_threads"].values())
        assert math.isclose(r["jax_tok_s"], 2 * 12 / r["jax_s"])
        assert math.isclose(r["ratio"], r["jax_tok_s"] / r["torch_tok_s"])
        assert r["max_abs_diff"] < 1e-4
    table = B.speed_table(rows)
    assert table.count("\n") == 3 and "tiny (2L, d 32, 4 heads, mlp 64)" in table


def test_bad_flags_are_named():
    from benchmarks import esm2_speed as B
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        B.main(["--shapes", "huge"])
    with pytest.raises(ValueError, match="--torch-threads"):
        B.main(["--torch-threads", "0"])
    for bad in ("x", "0,-1"):
        with pytest.raises(ValueError, match="--mem-attention-chunks"):
            B.main(["--mem-attention-chunks", bad])
    with pytest.raises(ValueError, match="seq=2"):
        B.tokens(1, 2)

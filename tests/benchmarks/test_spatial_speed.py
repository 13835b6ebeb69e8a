"""benchmarks/spatial_speed.py at tiny sizes: the PyTorch closed-form harmonics equal jaxemb's in float64,
both encoders give the same embeddings on the same weights, and the JSON is well-formed (no timing
asserted)."""
import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.requires_transformers  # the PyTorch peer needs torch (installed with that piece)


def test_closed_form_torch_harmonics_match_the_recurrence_in_float64():
    import torch
    from benchmarks import spatial_speed as B
    from jaxemb.models.spatial import spherical_harmonics
    rng = np.random.default_rng(11)
    ll = np.r_[np.c_[rng.uniform(-180, 180, 40), rng.uniform(-90, 90, 40)],
               [[0.0, 90.0], [37.0, -90.0], [180.0, 12.0], [-180.0, -33.0]]]  # poles, antimeridian
    got = B.torch_harmonics(torch.from_numpy(ll), 9).numpy()
    assert got.dtype == np.float64 and got.shape == (len(ll), 81)
    np.testing.assert_allclose(got, spherical_harmonics(ll, 9), rtol=0, atol=1e-12)
    assert B.legendre_coefficients(2, 0) == (-0.5, 0.0, 1.5)  # P_2 = (3x^2 - 1) / 2


def test_tiny_pair_agrees_and_the_json_is_well_formed(tmp_path):
    from benchmarks import spatial_speed as B
    pair = B.Pair(L=6, batch=32, hidden=16, dim=4, seed=2)
    j, t = pair.outputs()
    assert j.shape == t.shape == (32, 4)
    np.testing.assert_allclose(j, t, rtol=1e-4, atol=1e-5)
    loss, grads = pair.torch["fwd+bwd"]()
    assert len(grads) == 6 and all(g is not None and g.abs().max() > 0 for g in grads)
    out = tmp_path / "r.json"
    note = tmp_path / "n.md"
    res = B.main(["--legendre", "4,6", "--batch", "16", "--reps", "1", "--hidden", "8", "--dim", "4",
                  "--out", str(out), "--note", str(note)])
    saved = json.load(open(out))
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    assert [(r["L"], r["mode"]) for r in saved["rows"]] == [(4, "fwd"), (4, "fwd+bwd"), (6, "fwd"), (6, "fwd+bwd")]
    for r in saved["rows"]:
        assert r["features"] == r["L"] ** 2 and r["batch"] == 16 and r["reps"] == 1
        for k in ("jax_loc_s", "torch_loc_s", "ratio"):
            assert math.isfinite(r[k]) and r[k] > 0
        assert math.isclose(r["jax_loc_s"], 16 / r["jax_s"]) and math.isclose(r["ratio"], r["torch_s"] / r["jax_s"])
        assert r["max_abs_diff"] < 1e-4 and r["sh_err_jax"] < 1e-5 and r["sh_err_torch"] < 1e-4
        assert r["torch_sh_nonfinite"] == 0
    assert saved["host"]["cpu_model"] and saved["versions"]["torch"]
    text = note.read_text()
    assert text.count("\n| ") == 4 + 1 and saved["host"]["cpu_model"] in text
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # strict JSON
    with pytest.raises(ValueError, match="--legendre"):
        B.main(["--legendre", "0", "--out", str(out)])

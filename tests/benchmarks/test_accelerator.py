"""`python -m benchmarks.accelerator --preset cpu-smoke` end to end (every stage present, status ok, numbers
sane), its float64 reference against JAX autodiff, and stage isolation (a hung and a failing stage)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import accelerator, accelerator_stages as st
from jaxemb.kernels.attention_pool import reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(out, *args, env=None):
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=900)


def test_cpu_smoke_runs_every_stage_and_writes_json_and_markdown(tmp_path):
    # a generous budget: the stages' sizes are fixed; the budget would only cut a hung stage here
    proc = _run(tmp_path, "--preset", "cpu-smoke", "--budget-s", "700")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["stages"]) == list(accelerator.ORDER)
    bad = {k: (v["status"], v.get("error"), v.get("traceback", "")[-1500:]) for k, v in res["stages"].items()
           if v["status"] != "ok"}
    assert not bad, bad
    r = {k: v["result"] for k, v in res["stages"].items()}
    assert res["host"]["cpu_model"] and res["device"]["backend"] == "cpu"
    k = r["kernels"]
    assert k["interpret"] and k["all_pass"] and k["checked"] == len(k["cases"]) == 4
    assert {(c["mode"], c["dtype"]) for c in k["cases"]} == {(m, d) for m in ("lengths", "segments")
                                                             for d in ("bfloat16", "float32")}
    assert all(c["fwd_max_err"] < 0.1 and c["dq_max_err"] < 0.1 for c in k["cases"])
    assert {row["mode"] for row in r["bench"]["rows"]} == {"fwd", "fwd+bwd"} and not r["bench"]["errors"]
    lm = r["lm"]
    assert lm["dtype"] == "bfloat16" and lm["tokens_per_s"] > 0 and 0 < lm["mfu"] and lm["params"] > 0
    assert lm["tokens_per_s"] == pytest.approx(lm["batch"] * lm["seq"] / (lm["step_ms"] / 1e3))
    nfe = r["nfe"]
    assert nfe["dataset"] == "WN18RR" and nfe["model"] == "nfe1" and nfe["steps_per_epoch"] == 1357
    assert nfe["epoch_s"] == pytest.approx(nfe["steps_per_epoch"] * nfe["step_ms"] / 1e3)
    f = r["fidelity"]
    assert len(f["table"]) == 8 and all(row["standard"] > 1 and row["lexinvariant"] > 1 for row in f["table"])
    assert f["steps"] >= 4 and set(f["models"]) == {"standard", "lexinvariant"}
    md = (tmp_path / "results.md").read_text()
    for name in accelerator.ORDER:
        assert f"| {name} | ok |" in md and f"## {name}" in md
    assert "| positions | standard | lexinvariant | ratio |" in md and res["host"]["cpu_model"] in md


def test_a_hung_and_a_failing_stage_are_recorded_and_the_run_goes_on(tmp_path):
    proc = _run(tmp_path, "--preset", "cpu-smoke", "--stages", "nfe,kernels", "--budget-s", "20",
                env={accelerator.FAULT_ENV: "kernels:hang,nfe:raise"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    hung, failed = res["stages"]["kernels"], res["stages"]["nfe"]
    assert hung["status"] == "timeout" and "killed after" in hung["error"]
    assert failed["status"] == "error" and "fault injected into stage nfe" in failed["traceback"]
    md = (tmp_path / "results.md").read_text()
    assert "| kernels | timeout |" in md and "| nfe | error |" in md


def test_shares_split_the_time_left_by_weight():
    stages = list(accelerator.ORDER)
    total, left = 0.0, 480.0
    for i in range(len(stages)):
        s = accelerator.share(left, stages[i:])
        assert s == pytest.approx(left * accelerator.WEIGHTS[stages[i]] / sum(accelerator.WEIGHTS[x]
                                                                           for x in stages[i:]))
        total, left = total + s, left - s
    assert total == pytest.approx(480.0) and accelerator.share(-5.0, ["nfe"]) == 0.0


@pytest.mark.parametrize("mode", ["lengths", "segments"])
def test_float64_reference_matches_jax_autodiff(mode):
    rng = np.random.default_rng(1)
    x, q, kw, masks = st.random_case(rng, 4, 37, 6, 3, mode)
    g = rng.normal(size=(4, masks.shape[1], 3, 6))
    out, dx, dq = st.pool_and_grads_f64(x, q, masks, g)
    with jax.enable_x64(True):
        if mode == "lengths":
            starts, ends = reference.ranges_from_lengths(jnp.asarray(kw["lengths"]), 37)
        else:
            starts, ends = reference.ranges_from_segments(jnp.asarray(kw["segment_ids"]), kw["num_segments"])
        # the reference reads x, q and g as float32 values (what the kernels see)
        x32, q32 = (jnp.asarray(np.float32(a), jnp.float64) for a in (x, q))
        y, vjp = jax.vjp(lambda x, q: reference.pool_ranges(x, q, starts, ends)[0], x32, q32)
        want_dx, want_dq = vjp(jnp.asarray(np.float32(g), jnp.float64))
    np.testing.assert_allclose(out, np.asarray(y), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, np.asarray(want_dx), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dq, np.asarray(want_dq), rtol=1e-9, atol=1e-11)
    assert np.abs(dx).max() > 0 and (masks.sum(-1) == 0).any()  # an empty row is part of the case


def test_tolerance_ratio_scales_with_the_reference_and_fails_nan():
    want = np.array([100.0, 0.0])
    err, ratio = st.tolerance_ratio(np.array([100.5, 0.0]), want, 1e-3)
    assert err == pytest.approx(0.5) and ratio == pytest.approx(0.5 / (1e-3 * 100 + 1e-3 * 100))
    assert st.tolerance_ratio(np.array([np.nan, 0.0]), want, 1.0)[1] == float("inf")

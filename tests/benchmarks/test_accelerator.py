"""`python -m benchmarks.accelerator --preset cpu-smoke` end to end (every stage present, status ok, numbers
sane), stage isolation (a hung and a failing stage), and the kernel stage in-process at tiny sizes: its four
steps, wrong implementations failing its cases, and a failing step or case losing nothing else."""
import copy
import functools
import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import accelerator, accelerator_stages as st
from jaxemb.kernels import bench
from jaxemb.kernels.attention_pool import attention_pool

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
    assert k["interpret"] and k["all_pass"] and k["checked"] == len(k["cases"]) == 5
    assert list(k["steps"]) == [s[0] for s in st.KERNEL_STEPS]
    assert all(v["status"] == "ok" for v in k["steps"].values()), k["steps"]
    assert [c["status"] for c in k["compile"]] == ["ok"] * 3 and k["compile"][1]["D"] == 600
    assert {(b["fill"], b["mode"]) for b in k["bandwidth"]} == {(f, m) for f in ("full", "half")
                                                                for m in ("fwd", "fwd+bwd")}
    assert len(k["sweep"]) == 2 and not any(s["error"] for s in k["sweep"])
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


def _tiny(**changes):
    """The cpu-smoke kernel-stage settings, trimmed: the preset shape only, one sweep configuration (the
    default block, None, whose functions the bandwidth step has compiled already)."""
    p = copy.deepcopy(st.PRESETS["cpu-smoke"]["kernels"])
    p["compile"]["extra"] = []
    p["sweep"].update(grid={"block_l": (None,)}, shape=p["bandwidth"]["shapes"][0], dtype="float32",
                      iters=p["bandwidth"]["iters"])
    p.update(changes)
    return p


def test_kernel_stage_runs_its_four_steps_in_tiny_mode():
    p, out, saves = _tiny(), {}, []
    st.kernels(p, time.time() + 600, out, lambda: saves.append(1))
    assert list(out["steps"]) == ["compile", "cases", "bandwidth", "sweep"]
    assert all(v["status"] == "ok" for v in out["steps"].values()), out["steps"]
    assert [c["status"] for c in out["compile"]] == ["ok"] and out["compile"][0]["compile_s"] > 0
    assert [c["name"] for c in out["cases"]] == [c["name"] for c in p["cases"]]
    assert out["all_pass"] and out["checked"] == 5, [(c["name"], c["status"]) for c in out["cases"]]
    cases = {c["name"]: c for c in out["cases"]}
    assert cases["two head tiles, short segments"]["head_tiles"] == 2
    nan = cases["NaN padding"]
    assert nan["nan_padding"] and nan["dx_pad_max"] == 0 and nan["fwd_tol_ratio"] <= 1
    assert {(b["fill"], b["mode"]) for b in out["bandwidth"]} == {(f, m) for f in ("full", "half")
                                                                  for m in ("fwd", "fwd+bwd")}
    B, L, D, H = p["bandwidth"]["shapes"][0]
    for b in out["bandwidth"]:
        n = L if b["fill"] == "full" else L // 2
        assert b["error"] is None and b["gbps"] > 0 and b["xla_gbps"] > 0 and b["pct_peak"] is None
        assert b["mbytes"] == pytest.approx(bench.bytes_moved([n] * B, L, D, H, 4, b["mode"]) / 1e6)
    assert [(s["block_l"], s["error"]) for s in out["sweep"]] == [(None, None)] and out["sweep"][0]["fwd_ms"] > 0
    assert len(saves) >= 4
    md = "\n".join(accelerator.stage_markdown("kernels", out))
    for text in ("### compile", "| NaN padding |", "### bandwidth", "### sweep", "| half | fwd+bwd |"):
        assert text in md
    assert accelerator.headline("kernels", out).startswith("5/5 cases within tolerance; compiled 1/1")


def _xla_pool(impl, interpret):
    return functools.partial(attention_pool, implementation="xla")


def test_a_wrong_implementation_fails_its_cases(monkeypatch):
    p = _tiny(cases=[c for c in _tiny()["cases"] if c["kind"] == "lengths"])

    def unmasked(impl, interpret):  # pools the padding too
        if impl == "xla":
            return _xla_pool(impl, interpret)
        return lambda x, q, lengths: attention_pool(x, q, implementation="xla")

    def leaky(impl, interpret):  # forward within tolerance, but a gradient in the padding rows
        ref = _xla_pool(impl, interpret)
        return ref if impl == "xla" else lambda x, q, **kw: ref(x, q, **kw) + 1e-7 * jnp.sum(x)

    for wrong in (unmasked, leaky):
        monkeypatch.setattr(st, "pool_fn", wrong)
        out = dict(cases=[])
        st.kernel_cases(p, time.time() + 600, out, lambda: None)
        cases = {c["name"]: c for c in out["cases"]}
        assert [c["status"] for c in out["cases"]] == ["FAIL"] * 3, out["cases"]
        assert cases["NaN padding"]["fwd_tol_ratio"] == float("inf")
        lengths = cases["lengths 0/1/odd/L"]
        if wrong is unmasked:
            assert lengths["fwd_tol_ratio"] > 1
        else:
            assert lengths["fwd_tol_ratio"] <= 1 and lengths["dx_tol_ratio"] <= 1 and lengths["dx_pad_max"] > 0


def test_a_failing_step_or_case_loses_nothing_else(monkeypatch):
    calls = []

    def fine(name):
        return lambda p, deadline, out, flush: calls.append((name, deadline))

    def broken(p, deadline, out, flush):
        raise RuntimeError("step broke")

    monkeypatch.setattr(st, "KERNEL_STEPS", (("compile", fine("compile"), 0.2), ("cases", broken, 0.35),
                                             ("bandwidth", fine("bandwidth"), 0.5), ("sweep", fine("sweep"), 1.0)))
    out, end = {}, time.time() + 100
    st.kernels(_tiny(), end, out, lambda: None)
    assert out["steps"]["cases"]["status"] == "error" and "step broke" in out["steps"]["cases"]["error"]
    assert [c[0] for c in calls] == ["compile", "bandwidth", "sweep"] and not out["all_pass"]
    assert all(out["steps"][n]["status"] == "ok" for n in ("compile", "bandwidth", "sweep"))
    assert calls[0][1] < calls[1][1] < calls[2][1] <= end + 1       # each step its part, the last to the end
    # a case whose inputs cannot be built is an error row; the next case still runs; late cases are skipped
    monkeypatch.setattr(st, "pool_fn", _xla_pool)
    p = _tiny(cases=[dict(name="bad", kind="bogus", shape=(1, 8, 4, 2)),
                     dict(name="good", kind="lengths", shape=(4, 8, 4, 2))])
    out = dict(cases=[])
    st.kernel_cases(p, time.time() + 100, out, lambda: None)
    assert [c["status"] for c in out["cases"]] == ["error", "pass"] and "bogus" in out["cases"][0]["error"]
    out = dict(cases=[])
    st.kernel_cases(p, time.time() - 1, out, lambda: None)
    assert [c["status"] for c in out["cases"]] == ["skipped (time budget)"] * 2


def test_case_inputs_cover_edge_lengths_empty_segments_and_nan_padding():
    rng = np.random.default_rng(0)
    x, q, kw, pad = st.case_inputs(rng, dict(kind="lengths", shape=(5, 9, 3, 2), nan=True))
    assert kw["lengths"].tolist() == [9, 1, 5, 0, 9] and pad.sum(1).tolist() == [0, 8, 4, 9, 0]
    assert np.isnan(x[pad]).all() and np.isfinite(x[~pad]).all() and q.shape == (2, 3)
    x, q, kw, pad = st.case_inputs(rng, dict(kind="segments", shape=(3, 40, 3, 2), segments=6, seg_len=4))
    ids = kw["segment_ids"]
    np.testing.assert_array_equal(pad, ids < 0)
    assert (ids[1] == -1).all() and kw["num_segments"] == 6 and np.isfinite(x).all()
    for row in ids:
        n = int((row >= 0).sum())
        assert (row[n:] == -1).all() and (np.diff(row[:n]) >= 0).all()   # sorted runs, trailing padding
    present = set(ids[0][ids[0] >= 0].tolist())
    assert {0, 2, 3, 5} <= present and not {1, 4} & present              # every third id is empty


def test_tolerance_ratio_scales_with_the_reference_and_fails_nan():
    want = np.array([100.0, 0.0])
    err, ratio = st.tolerance_ratio(np.array([100.5, 0.0]), want, 1e-3)
    assert err == pytest.approx(0.5) and ratio == pytest.approx(0.5 / (1e-3 * 100 + 1e-3 * 100))
    assert st.tolerance_ratio(np.array([np.nan, 0.0]), want, 1.0)[1] == float("inf")

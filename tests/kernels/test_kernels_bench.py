"""jaxemb.kernels.bench: runs end to end at tiny sizes (--preset cpu-smoke), so the script the
accelerator check calls cannot rot; the byte count behind GB/s; the looped timing really makes N
dependent calls; the knob sweep. Timings are not asserted."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.kernels import bench


def test_cpu_smoke_preset_reports_every_column(tmp_path, capsys):
  rows = bench.main(["--preset", "cpu-smoke", "--dtypes", "bfloat16", "--kernels", "pallas_gpu",
                     "--workdir", str(tmp_path)])
  kinds = {(r["kernel"], r["fill"], r["mode"]) for r in rows}
  assert kinds == {("pallas_gpu (interpret)", f, m) for f in ("full", "half")
                   for m in ("fwd", "fwd+bwd")}
  for r in rows:
    assert r["error"] is None and r["gbps"] > 0 and r["speedup"] > 0
    assert r["max_err"] < 0.5 and r["pct_peak"] is None       # no HBM peak for a CPU
    assert r["dispatch_ms"] is None and r["calls"] == 1 and r["copies"] == 1  # accelerators only
    lengths = np.full(2, 40 if r["fill"] == "full" else 20)
    moved = bench.bytes_moved(lengths, 40, 16, 2, 2, r["mode"])
    assert r["mbytes"] == pytest.approx(moved / 1e6)
    assert r["gbps"] == pytest.approx(moved / (r["ms"] / 1e3) / 1e9)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == rows and saved["meta"]["fills"] == ["full", "half"]
  md = (tmp_path / "table.md").read_text()
  assert "| GB/s |" in md and "%peak" in md and "dispatch ms" in md and md.count("fwd+bwd") == 2
  assert "fwd+bwd" in capsys.readouterr().out


def test_bytes_moved_counts_valid_rows_queries_and_outputs():
  # x (2, 4, 2) bf16, lengths (3, 0), one head: valid rows 3 * 2 * 2 B, queries 8 B, output 2 * 8 B
  assert bench.bytes_moved([3, 0], 4, 2, 1, 2, "fwd") == 12 + 8 + 16
  # backward: valid rows again, queries, cotangent, all of dx (2 * 4 * 2 * 2 B) and dq
  assert bench.bytes_moved([3, 0], 4, 2, 1, 2, "fwd+bwd") == 36 + 12 + 8 + 16 + 32 + 8
  full = bench.bytes_moved([4096] * 8, 4096, 1024, 8, 2, "fwd")
  half = bench.bytes_moved([2048] * 8, 4096, 1024, 8, 2, "fwd")
  assert half / full == pytest.approx(0.5, rel=1e-2)          # padding is never read
  assert bench.bytes_moved([9], 4, 2, 1, 4, "fwd") == bench.bytes_moved([4], 4, 2, 1, 4, "fwd")
  with pytest.raises(ValueError, match="mode"):
    bench.bytes_moved([1], 4, 2, 1, 4, "bwd")


def test_fill_lengths():
  rng = np.random.default_rng(0)
  assert bench.fill_lengths("full", 3, 10, rng).tolist() == [10] * 3
  assert bench.fill_lengths("half", 3, 10, rng).tolist() == [5] * 3
  ragged = bench.fill_lengths("ragged", 50, 10, rng)
  assert ragged.min() >= 5 and ragged.max() <= 10 and len(set(ragged.tolist())) > 1
  with pytest.raises(ValueError, match="fill"):
    bench.fill_lengths("most", 3, 10, rng)


def test_looped_makes_n_dependent_calls():
  calls = []

  def fn(x, q, lengths):
    jax.debug.callback(lambda: calls.append(1))
    return (x * q).sum(1) + lengths, q[0] * 2.0

  args = (jnp.ones((3, 2)), jnp.full((2,), 0.5), jnp.arange(3.0))
  xs, rest = (args[0],), args[1:]
  out = jax.block_until_ready(bench.looped(fn, 5)(xs, *rest, jnp.float32(0)))
  assert len(calls) == 5                                      # one trace, five executed calls
  for a, b in zip(out, fn(*args)):                            # c = 0: the result of one call
    np.testing.assert_allclose(a, b)
  # c != 0: each call's queries depend on the call before, so five calls differ from one
  out = bench.looped(fn, 5)(xs, *rest, jnp.float32(1.0))
  assert not np.allclose(out[0], fn(*args)[0])
  calls.clear()
  t, outs = bench.per_call_s(fn, args, 3, repeats=1, copies=2)   # 2 rounds over 2 copies of x
  assert len(calls) == 2 * 4 and t > 0 and np.allclose(outs[0], fn(*args)[0])  # warm-up + 1 run
  assert bench.copies_for(bench.ROTATE_BYTES // 2) == 2 and bench.copies_for(1) == bench.MAX_COPIES
  assert bench.copies_for(bench.ROTATE_BYTES) == bench.copies_for(10 * bench.ROTATE_BYTES) == 1
  assert bench.looped(fn, 3) is bench.looped(fn, 3)           # cached: one compile per function
  assert bench.dispatch_s(fn, args, 2) > 0 and bench.compiled(fn, args) is bench.compiled(fn, args)


def test_a_wrong_kernel_is_reported_not_timed(monkeypatch, tmp_path):
  right = bench._functions

  def wrong(impl, interpret, **knobs):
    f, g = right("xla", False)
    return (lambda x, q, n: f(x, q, n) + 1.0, g) if impl != "xla" else (f, g)

  monkeypatch.setattr(bench, "_functions", wrong)
  rows = bench.run([(2, 8, 4, 2)], [jnp.float32], "pallas_tpu", True, 1, fills=("full",))
  assert len(rows) == 1 and "disagrees with XLA" in rows[0]["error"]
  with pytest.raises(SystemExit, match="1 of 1 rows failed"):
    bench.main(["--preset", "cpu-smoke", "--dtypes", "float32", "--kernels",
                "pallas_tpu", "--fills", "full", "--workdir", str(tmp_path)])
  assert "disagrees with XLA" in (tmp_path / "table.md").read_text()
  rows = bench.sweep((2, 8, 4, 2), jnp.float32, "pallas_gpu", True, 1, grid={"block_l": (16,)},
                     repeats=1)
  assert len(rows) == 1 and "disagrees with XLA" in rows[0]["error"] and "fwd_ms" not in rows[0]


def test_budget_stops_new_shapes():
  skipped = []
  rows = bench.run([(2, 8, 4, 2)] * 2, [jnp.float32], ["pallas_gpu"], True, 1,
                   budget_s=-1.0, skipped=skipped)
  assert rows == [] and len(skipped) == 4                     # 2 shapes x 2 fills


def test_gpu_preset_reaches_32k():
  assert max(L for _, L, _, _ in bench.PRESETS["gpu"]) == 32768
  assert bench.peak_gbps(type("D", (), {"device_kind": "NVIDIA H200"})) == 4800
  assert bench.peak_gbps(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})) == 3350
  assert bench.peak_gbps(type("D", (), {"device_kind": "cpu"})) is None


def test_sweep_skips_unknown_knobs_and_runs_the_rest():
  notes = []
  grid = {"block_l": (16, 32), "no_such_knob": (1, 2)}
  rows = bench.sweep((2, 40, 16, 2), jnp.float32, "pallas_gpu", True, 1, grid=grid,
                     note=notes.append, repeats=1)
  assert "block_l" in bench.kernel_knobs("pallas_gpu")
  assert len(notes) == 1 and "no_such_knob" in notes[0]
  assert [r["block_l"] for r in rows] == [16, 32] and all("no_such_knob" not in r for r in rows)
  for r in rows:
    assert r["error"] is None and r["fwd_ms"] > 0 and r["fwd+bwd_gbps"] > 0
    assert r["fwd_err"] < 1e-3 and r["fwd+bwd_err"] < 1e-2
  assert "| block_l |" in bench.sweep_table(rows)
  late = bench.sweep((2, 40, 16, 2), jnp.float32, "pallas_gpu", True, 1,
                     grid={"block_l": (16,)}, deadline=0.0, repeats=1)
  assert late[0]["error"] == "skipped (time budget)"


def test_a_knob_only_the_kernel_module_takes_goes_to_forward_and_backward(monkeypatch):
  # A knob the kernel's forward/backward accept but api.attention_pool does not: the sweep calls
  # the kernel module directly; the result must still match XLA, values and gradients.
  monkeypatch.setattr(bench, "kernel_knobs", lambda kernel: {"block_l": "module"})
  rng = np.random.default_rng(3)
  x, q = bench._inputs(rng, 2, 40, 16, 3, jnp.float32)
  lengths = jnp.asarray([0, 23])
  got = [jax.jit(f)(x, q, lengths) for f in bench._functions("pallas_gpu", True, block_l=16)]
  want = [jax.jit(f)(x, q, lengths) for f in bench._functions("xla", False)]
  assert bench._max_diff(got, want) < 1e-4 and float(jnp.abs(got[1][0]).max()) > 0


@pytest.mark.parametrize("knobs", [{}, {"block_l": 32, "num_warps": 8, "num_stages": 3}])
def test_looped_kernels_lower_for_cuda(knobs):
  # Without a GPU: the timed loops (2 copies of x) lower for CUDA with one Triton call per
  # kernel call, so nothing is hoisted or merged; the knobs reach the kernels.
  from jaxemb.kernels.attention_pool import pallas_gpu
  knobs = {k: v for k, v in knobs.items() if k in bench.kernel_knobs("pallas_gpu")}
  xs = (jax.ShapeDtypeStruct((2, 256, 128), jnp.bfloat16),) * 2
  args = (xs, jax.ShapeDtypeStruct((4, 128), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.float32))
  with pallas_gpu.abstract_gpu():
    texts = [bench.looped(fn, 5, 2).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
             for fn in bench._functions("pallas_gpu", False, **knobs)]
  assert [t.count("triton") for t in texts] == [2, 4] and all("while" in t for t in texts)
  for name, value in knobs.items():
    if name != "block_l":                                     # warps and stages are lowered attributes
      assert texts[0].count(f"{name} = {value} : i32") == 2

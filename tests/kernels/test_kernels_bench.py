"""jaxemb.kernels.bench runs end to end at tiny sizes (--preset cpu-smoke), so the script
the accelerator check calls cannot rot; timings are not asserted."""
import json

import jax.numpy as jnp
import pytest

from jaxemb.kernels import bench


def test_cpu_smoke_preset_reports_every_column(tmp_path, capsys):
  rows = bench.main(["--preset", "cpu-smoke", "--dtypes", "bfloat16",
                     "--workdir", str(tmp_path)])
  kinds = {(r["kernel"], r["dtype"], r["mode"]) for r in rows}
  assert kinds == {(k + " (interpret)", "bfloat16", m) for k in bench.KERNELS
                   for m in ("fwd", "fwd+bwd")}
  for r in rows:
    assert r["error"] is None and r["gbps"] > 0 and r["speedup"] > 0
    assert r["max_err"] < (1e-3 if r["dtype"] == "float32" else 0.5)
    assert r["pct_peak"] is None                       # no HBM peak for a CPU
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == rows and saved["meta"]["preset"] == "cpu-smoke"
  md = (tmp_path / "table.md").read_text()
  assert "| GB/s |" in md and "%peak" in md and "speedup" in md and md.count("fwd+bwd") == 2
  assert "fwd+bwd" in capsys.readouterr().out


def test_gpu_preset_reaches_32k():
  assert max(L for _, L, _, _ in bench.PRESETS["gpu"]) == 32768
  assert bench.peak_gbps(type("D", (), {"device_kind": "NVIDIA H200"})) == 4800


def test_a_wrong_kernel_is_reported_not_timed(monkeypatch, tmp_path):
  right = bench._functions

  def wrong(impl, interpret, lengths):
    f, g = right("xla", False, lengths)
    return (lambda x, q: f(x, q) + 1.0, g) if impl != "xla" else (f, g)

  monkeypatch.setattr(bench, "_functions", wrong)
  rows = bench.run([(2, 8, 4, 2)], [jnp.float32], "pallas_tpu", True, 1)
  assert len(rows) == 1 and "disagrees with XLA" in rows[0]["error"]
  with pytest.raises(SystemExit, match="1 of 1 rows failed"):
    bench.main(["--preset", "cpu-smoke", "--dtypes", "float32", "--kernels",
                "pallas_tpu", "--workdir", str(tmp_path)])
  assert "disagrees with XLA" in (tmp_path / "table.md").read_text()


def test_budget_stops_new_shapes():
  skipped = []
  rows = bench.run([(2, 8, 4, 2)] * 2, [jnp.float32], ["pallas_gpu"], True, 1,
                   budget_s=-1.0, skipped=skipped)
  assert rows == [] and len(skipped) == 2

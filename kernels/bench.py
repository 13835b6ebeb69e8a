"""Attention-pooling benchmark: `python -m jaxemb.kernels.bench [--preset NAME]`.

Presets: gpu and tpu (the accelerator tables, L up to 32k), small (CPU), and
cpu-smoke (tiny shapes, both kernels in interpret mode; the suite runs it so the
script cannot rot). Checks each Pallas kernel against the XLA reference first,
then times forward and forward+backward per shape (B, L, D, H, dtype): median
time, achieved GB/s (bytes of x moved: forward reads x once; forward+backward
reads it twice and writes dx), percent of the device's peak HBM bandwidth,
speed-up over XLA, and the compiled temporary memory. Prints a table and writes
results.json, table.md and (with matplotlib) bench.png into --workdir. On CPU the
kernels run in interpret mode: those timings say nothing about speed, they only
show the path runs. --budget-s stops starting new shapes once it is spent.
"""
import argparse
import itertools
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from .attention_pool import api

# Peak HBM bandwidth in GB/s by device_kind substring (vendor spec sheets).
PEAK_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300,
             "TPU v4": 1200, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765,
             "TPU v5": 2765, "TPU v6": 1640}
PRESETS = {
    "cpu-smoke": [(2, 40, 16, 2)],
    "small": [(4, 512, 128, 4), (2, 2048, 256, 8)],
    "gpu": [(8, 4096, 1024, 8), (32, 4096, 1024, 8), (4, 16384, 1024, 16),
            (64, 1024, 768, 12), (2, 32768, 1024, 16)],
}
PRESETS["tpu"] = PRESETS["gpu"]
KERNELS = ("pallas_gpu", "pallas_tpu")


def peak_gbps(device):
  for key, value in PEAK_GBPS.items():
    if key.lower() in device.device_kind.lower():
      return value
  return None


def _timed(fn, args, iters):
  jax.block_until_ready(fn(*args))                   # compile + warm up
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _temp_mb(fn, args):
  try:
    stats = fn.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 2**20
  except Exception:  # not every backend reports memory analysis
    return None


def _functions(impl, interpret, lengths):
  def fwd(x, q):
    return api.attention_pool(x, q, lengths=lengths, implementation=impl,
                              interpret=interpret)

  def loss(x, q):
    return jnp.sum(fwd(x, q).astype(jnp.float32) ** 2)

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


def run(shapes, dtypes, kernels, interpret, iters, seed=0, budget_s=None, skipped=None):
  """Table rows for each shape x dtype x kernel (kernels: a name or a list). A
  kernel that fails or disagrees with XLA gives one row with an "error" and no
  timings. Runs not started because budget_s ran out go to the list skipped."""
  kernels = [kernels] if isinstance(kernels, str) else list(kernels)
  rows, skipped = [], ([] if skipped is None else skipped)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for (B, L, D, H), dtype, kernel in itertools.product(shapes, dtypes, kernels):
    key = dict(B=B, L=L, D=D, H=H, dtype=jnp.dtype(dtype).name,
               kernel=kernel + (" (interpret)" if interpret else ""))
    if budget_s is not None and time.perf_counter() - start > budget_s:
      skipped.append(key)
      continue
    try:
      rows += _measure(key, rng, dtype, kernel, interpret, iters)
    except Exception as e:  # keep the other shapes' numbers
      rows.append(dict(key, mode="-", error=f"{type(e).__name__}: {e}"[:300]))
  return rows


def _measure(key, rng, dtype, kernel, interpret, iters):
  B, L, D, H = key["B"], key["L"], key["D"], key["H"]
  peak = peak_gbps(jax.devices()[0])
  x = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  lengths = jnp.asarray(rng.integers(L // 2, L + 1, size=B), jnp.int32)
  xla_f, xla_g = _functions("xla", False, lengths)
  ker_f, ker_g = _functions(kernel, interpret, lengths)
  # Correctness first: kernel vs XLA reference on these inputs.
  diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  err = diff(ker_f(x, q), xla_f(x, q))
  gerr = max(diff(a, b) for a, b in zip(ker_g(x, q), xla_g(x, q)))
  tol = 1e-3 if dtype == jnp.float32 else 5e-2
  if not (err < tol and gerr < 10 * tol):
    raise ValueError(f"kernel disagrees with XLA: forward {err:.2e} (tol {tol:g}), "
                     f"grad {gerr:.2e} (tol {10 * tol:g})")
  nbytes = B * L * D * jnp.dtype(dtype).itemsize
  rows = []
  for mode, (kf, xf, moved) in {"fwd": (ker_f, xla_f, nbytes),
                                "fwd+bwd": (ker_g, xla_g, 3 * nbytes)}.items():
    t_k, t_x = _timed(kf, (x, q), iters), _timed(xf, (x, q), iters)
    gbps = moved / t_k / 1e9
    rows.append(dict(key, mode=mode, ms=t_k * 1e3, xla_ms=t_x * 1e3, gbps=gbps,
                     xla_gbps=moved / t_x / 1e9,
                     pct_peak=100 * gbps / peak if peak else None,
                     speedup=t_x / t_k,
                     temp_mb=None if interpret else _temp_mb(kf, (x, q)),
                     max_err=err if mode == "fwd" else gerr, error=None))
  return rows


def table(rows):
  head = ("B", "L", "D", "H", "dtype", "mode", "kernel", "ms", "xla_ms", "GB/s",
          "xla GB/s", "%peak", "speedup", "temp MB", "max err", "error")
  fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    vals = [r.get(k) for k in ("B", "L", "D", "H", "dtype", "mode", "kernel", "ms",
                               "xla_ms", "gbps", "xla_gbps", "pct_peak", "speedup",
                               "temp_mb", "max_err")]
    vals.append((r.get("error") or "").replace("|", "/").replace("\n", " "))
    lines.append("| " + " | ".join(fmt(v) for v in vals) + " |")
  return "\n".join(lines)


def _write_atomic(path, data, mode="w"):
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
  with os.fdopen(fd, mode) as f:
    f.write(data)
  os.replace(tmp, path)


def plot(rows, path):
  try:
    import matplotlib
  except ImportError:   # optional; the lent accelerator images may lack it
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  labels = [f"{r['B']}x{r['L']}x{r['D']} H{r['H']} {r['dtype']}\n{r['mode']}" for r in rows]
  pos = np.arange(len(rows))
  ax.bar(pos - 0.2, [r["ms"] for r in rows], 0.4, label=rows[0]["kernel"])
  ax.bar(pos + 0.2, [r["xla_ms"] for r in rows], 0.4, label="xla")
  ax.set_xticks(pos, labels, fontsize=6, rotation=30, ha="right")
  ax.set_ylabel("ms (median)")
  ax.set_yscale("log")
  ax.legend()
  ax.set_title(f"attention_pool on {jax.devices()[0].device_kind}")
  fig.tight_layout()
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".png")
  os.close(fd)
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return True


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  backend = jax.default_backend()
  default = {"gpu": "gpu", "tpu": "tpu"}.get(backend, "small")
  p.add_argument("--preset", choices=sorted(PRESETS), default=default)
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--kernels", default=None,
                 help="comma list of pallas_gpu, pallas_tpu; default: the device's "
                      "kernel (both in interpret mode with --preset cpu-smoke)")
  p.add_argument("--iters", type=int, default=None,
                 help="timed calls per measurement (default 20 on an accelerator, 3 "
                      "on CPU, 1 for cpu-smoke)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="start no new shape after this many seconds")
  p.add_argument("--workdir", "--out", dest="workdir", default="runs/kernels_bench")
  args = p.parse_args(argv)
  accelerator = backend in ("gpu", "tpu")
  if args.kernels:
    kernels = args.kernels.split(",")
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
      p.error(f"--kernels: unknown {bad}; choose from {KERNELS}")
  elif accelerator:
    kernels = ["pallas_" + backend]
  else:
    kernels = list(KERNELS) if args.preset == "cpu-smoke" else ["pallas_tpu"]
  if accelerator and any(k != "pallas_" + backend for k in kernels):
    p.error(f"--kernels: on {backend} only pallas_{backend} runs compiled")
  iters = args.iters or (20 if accelerator else 1 if args.preset == "cpu-smoke" else 3)
  if iters < 1:
    p.error("--iters must be >= 1")
  try:
    dtypes = [jnp.dtype(d).type for d in args.dtypes.split(",")]
  except TypeError as e:
    p.error(f"--dtypes: {e}")
  skipped = []
  rows = run(PRESETS[args.preset], dtypes, kernels, not accelerator, iters,
             budget_s=args.budget_s, skipped=skipped)
  meta = dict(device=jax.devices()[0].device_kind, backend=backend,
              jax=jax.__version__, python=platform.python_version(),
              peak_gbps=peak_gbps(jax.devices()[0]), preset=args.preset,
              iters=iters, skipped=skipped)
  os.makedirs(args.workdir, exist_ok=True)
  _write_atomic(os.path.join(args.workdir, "results.json"),
                json.dumps(dict(meta=meta, rows=rows), indent=1))
  head = (f"device: {meta['device']} ({backend}), jax {jax.__version__}, "
          f"peak {meta['peak_gbps'] or '?'} GB/s, preset {args.preset}")
  text = table(rows)
  _write_atomic(os.path.join(args.workdir, "table.md"), head + "\n\n" + text + "\n")
  timed = [r for r in rows if not r.get("error")]
  plotted = bool(timed) and plot(timed, os.path.join(args.workdir, "bench.png"))
  print(head)
  print(text)
  if skipped:
    print(f"skipped (time budget): {len(skipped)} shape/dtype/kernel runs")
  print(f"wrote {args.workdir}/results.json, table.md" + (", bench.png" if plotted else ""))
  failed = [r for r in rows if r.get("error")]
  if failed:
    raise SystemExit(f"{len(failed)} of {len(rows)} rows failed; see the error column")
  return rows


if __name__ == "__main__":
  main()

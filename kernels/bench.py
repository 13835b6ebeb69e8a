"""Attention-pooling benchmark: `python -m kernels.bench [--preset small|gpu|tpu]`.

Checks the Pallas kernel against the XLA reference first, then times forward and
forward+backward per shape (B, L, D, H, dtype): median time, achieved GB/s (bytes
of x moved: forward reads x once; forward+backward reads it twice and writes dx),
percent of the device's peak HBM bandwidth, speed-up over XLA, and the compiled
temporary memory. Prints a table and writes results.json and bench.png into
--workdir. On CPU it runs small shapes with XLA and the TPU kernel in interpret
mode (interpret timings say nothing about speed; they only show the path runs).
"""
import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention_pool import api

# Peak HBM bandwidth in GB/s by device_kind substring (vendor spec sheets).
PEAK_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300,
             "TPU v4": 1200, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765,
             "TPU v5": 2765, "TPU v6": 1640}
PRESETS = {
    "small": [(4, 512, 128, 4), (2, 2048, 256, 8)],
    "gpu": [(8, 4096, 1024, 8), (32, 4096, 1024, 8), (4, 16384, 1024, 16),
            (64, 1024, 768, 12), (1, 65536, 1280, 16)],
}
PRESETS["tpu"] = PRESETS["gpu"]


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


def run(shapes, dtypes, kernel, interpret, iters, seed=0):
  device = jax.devices()[0]
  peak = peak_gbps(device)
  rows = []
  rng = np.random.default_rng(seed)
  for (B, L, D, H) in shapes:
    for dtype in dtypes:
      x = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
      q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
      lengths = jnp.asarray(rng.integers(L // 2, L + 1, size=B), jnp.int32)
      xla_f, xla_g = _functions("xla", False, lengths)
      ker_f, ker_g = _functions(kernel, interpret, lengths)
      # Correctness first: kernel vs XLA reference on these inputs.
      err = float(jnp.max(jnp.abs(ker_f(x, q).astype(jnp.float32)
                                  - xla_f(x, q).astype(jnp.float32))))
      gk, gx = ker_g(x, q), xla_g(x, q)
      gerr = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                 for a, b in zip(gk, gx))
      tol = 1e-3 if dtype == jnp.float32 else 5e-2
      if not (err < tol and gerr < 10 * tol):
        raise SystemExit(f"kernel mismatch at {(B, L, D, H, dtype.__name__)}: "
                         f"forward {err:.2e}, grad {gerr:.2e}")
      nbytes = B * L * D * jnp.dtype(dtype).itemsize
      for mode, (kf, xf, moved) in {"fwd": (ker_f, xla_f, nbytes),
                                    "fwd+bwd": (ker_g, xla_g, 3 * nbytes)}.items():
        t_k, t_x = _timed(kf, (x, q), iters), _timed(xf, (x, q), iters)
        gbps = moved / t_k / 1e9
        rows.append(dict(B=B, L=L, D=D, H=H, dtype=jnp.dtype(dtype).name, mode=mode,
                         kernel=kernel + (" (interpret)" if interpret else ""),
                         ms=t_k * 1e3, xla_ms=t_x * 1e3, gbps=gbps,
                         xla_gbps=moved / t_x / 1e9,
                         pct_peak=100 * gbps / peak if peak else None,
                         speedup=t_x / t_k, temp_mb=_temp_mb(kf, (x, q)),
                         max_err=err if mode == "fwd" else gerr))
  return rows


def table(rows):
  head = ("B", "L", "D", "H", "dtype", "mode", "kernel", "ms", "xla_ms", "GB/s",
          "xla GB/s", "%peak", "speedup", "temp MB", "max err")
  fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    vals = (r["B"], r["L"], r["D"], r["H"], r["dtype"], r["mode"], r["kernel"], r["ms"],
            r["xla_ms"], r["gbps"], r["xla_gbps"], r["pct_peak"], r["speedup"], r["temp_mb"],
            r["max_err"])
    lines.append("| " + " | ".join(fmt(v) for v in vals) + " |")
  return "\n".join(lines)


def _write_atomic(path, data, mode="w"):
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
  with os.fdopen(fd, mode) as f:
    f.write(data)
  os.replace(tmp, path)


def plot(rows, path):
  import matplotlib
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
  os.replace(tmp, path)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  backend = jax.default_backend()
  default = {"gpu": "gpu", "tpu": "tpu"}.get(backend, "small")
  p.add_argument("--preset", choices=sorted(PRESETS), default=default)
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--iters", type=int, default=3 if default == "small" else 20)
  p.add_argument("--workdir", default="runs/kernels_bench")
  args = p.parse_args(argv)
  kernel = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "pallas_tpu")
  interpret = backend not in ("gpu", "tpu")
  dtypes = [jnp.dtype(d).type for d in args.dtypes.split(",")]
  rows = run(PRESETS[args.preset], dtypes, kernel, interpret, args.iters)
  meta = dict(device=jax.devices()[0].device_kind, backend=backend,
              jax=jax.__version__, python=platform.python_version(),
              peak_gbps=peak_gbps(jax.devices()[0]), preset=args.preset)
  os.makedirs(args.workdir, exist_ok=True)
  _write_atomic(os.path.join(args.workdir, "results.json"),
                json.dumps(dict(meta=meta, rows=rows), indent=1))
  plot(rows, os.path.join(args.workdir, "bench.png"))
  print(f"device: {meta['device']} ({backend}), jax {jax.__version__}, "
        f"peak {meta['peak_gbps'] or '?'} GB/s")
  print(table(rows))
  print(f"wrote {args.workdir}/results.json and bench.png")


if __name__ == "__main__":
  main()

"""Attention-pooling benchmark: `python -m jaxemb.kernels.bench [--preset NAME]`.

Presets: gpu and tpu (the accelerator tables, L up to 32k), small (CPU), and
cpu-smoke (tiny shapes, both kernels in interpret mode; the suite runs it so the
script cannot rot). Checks each Pallas kernel against the XLA reference first,
then times forward and forward+backward per shape (B, L, D, H, dtype) and fill
(full: every row has length L; half: every row L // 2; ragged: uniform in
[L/2, L]).

Timing: one jit runs N dependent calls in a lax.fori_loop (see `looped`), so a
10-50 microsecond kernel is not lost in dispatch; ms is the median loop time / N.
On an accelerator the loop rotates up to 4 copies of x (`copies_for`), so that
even half-filled inputs are read from HBM, not from L2. dispatch ms (accelerators
only) is the median of single calls, dispatch included, for comparison. GB/s divides the bytes a pass must move (`bytes_moved`: only valid
rows of x are read) by ms; %peak uses the device's spec-sheet HBM bandwidth.
Also: speed-up over XLA and the compiled temporary memory. Prints a table and
writes results.json, table.md and (with matplotlib) bench.png into --workdir. On
CPU the kernels run in interpret mode: those timings say nothing about speed,
they only show the path runs. --budget-s stops starting new shapes once spent.

`sweep` times the kernel over its tuning knobs (block rows, warps, stages) where
the kernel accepts them (`kernel_knobs`); `--sweep` runs it on SWEEP_SHAPE.
"""
import argparse
import functools
import importlib
import inspect
import itertools
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .attention_pool import api, reference, vjp

# Peak HBM bandwidth in GB/s by device_kind substring (vendor spec sheets), first match wins.
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
FILLS = ("full", "half", "ragged")
# Tuning knobs the sweep tries, where the kernel takes them as keyword arguments.
SWEEP = {"block_l": (16, 32, 64), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
SWEEP_SHAPE = (8, 4096, 1024, 8)


def peak_gbps(device):
  for key, value in PEAK_GBPS.items():
    if key.lower() in device.device_kind.lower():
      return value
  return None


def bytes_moved(lengths, seq_len, dim, heads, itemsize, mode):
  """Bytes one call must move (the GB/s numerator) for x (B, seq_len, dim) of
  `itemsize` bytes and lengths (B,). Forward: reads the valid rows of x
  (sum(lengths) * dim * itemsize; padding is never read) and the float32
  (heads, dim) queries, writes the float32 (B, heads, dim) output. fwd+bwd adds
  the backward: it reads the valid rows and the queries again and the float32
  output cotangent, and writes every row of dx (padding as zeros) and float32 dq.
  The (B, heads) log-sum-exp and delta vectors are left out."""
  if mode not in ("fwd", "fwd+bwd"):
    raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
  lengths = np.clip(np.asarray(lengths, np.int64), 0, seq_len)
  batch = lengths.size
  valid = int(lengths.sum()) * dim * itemsize
  q, out = heads * dim * 4, batch * heads * dim * 4
  fwd = valid + q + out
  if mode == "fwd":
    return fwd
  return fwd + valid + q + out + batch * seq_len * dim * itemsize + q


def fill_lengths(fill, batch, seq_len, rng):
  """(B,) int32 lengths for a fill: full (L), half (L // 2), ragged (U[L/2, L])."""
  if fill == "full":
    return np.full(batch, seq_len, np.int32)
  if fill == "half":
    return np.full(batch, seq_len // 2, np.int32)
  if fill == "ragged":
    return rng.integers(seq_len // 2, seq_len + 1, size=batch).astype(np.int32)
  raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")


def _module(kernel):
  return importlib.import_module(f"{__package__}.attention_pool.{kernel}")


def kernel_knobs(kernel):
  """{knob: "api" or "module"} for the SWEEP knobs `kernel` accepts: as keyword
  arguments of api.attention_pool, or else of both its forward and backward."""
  in_api = inspect.signature(api.attention_pool).parameters
  mod = _module(kernel)
  in_mod = (set(inspect.signature(mod.forward).parameters)
            & set(inspect.signature(mod.backward).parameters))
  return {k: "api" if k in in_api else "module" for k in SWEEP
          if k in in_api or k in in_mod}


@functools.lru_cache(maxsize=None)
def _functions(impl, interpret, **knobs):
  """(fwd, grad): plain functions of (x, q, lengths) for one implementation;
  grad is d/d(x, q) of sum(fwd ** 2). Cached, so that every caller shares one
  function object per configuration, and with it the jit caches. knobs go to
  api.attention_pool, or, for those only the kernel module takes, straight to
  its forward and backward."""
  module_knobs = {k: v for k, v in knobs.items()
                  if impl != "xla" and kernel_knobs(impl).get(k) == "module"}
  api_knobs = {k: v for k, v in knobs.items() if k not in module_knobs}

  def fwd(x, q, lengths):
    if not module_knobs:
      return api.attention_pool(x, q, lengths=lengths, implementation=impl,
                                interpret=interpret, **api_knobs)
    mod, kw = _module(impl), dict(api_knobs, **module_knobs, interpret=interpret)
    pool = vjp.make_pool(functools.partial(mod.forward, **kw),
                         functools.partial(mod.backward, **kw))
    starts, ends = reference.ranges_from_lengths(lengths, x.shape[1])
    return pool(x, q.astype(jnp.float32), starts, ends)[:, 0].astype(x.dtype)

  def loss(x, q, lengths):
    return jnp.sum(fwd(x, q, lengths).astype(jnp.float32) ** 2)

  return fwd, jax.grad(loss, argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def looped(fn, n, copies=1):
  """jit of (xs, q, lengths, c) -> the outputs of n rounds in one fori_loop; a
  round calls fn once on each of the `copies` arrays in the tuple xs (copies of
  x: rotating them keeps x out of the L2 cache between calls). Each call gets
  queries q + c * s, s the sum of one element of each output of the call before
  and c a traced 0.0: the calls depend on each other, so XLA can neither hoist
  nor merge them, for the price of an (H, D) add per call. n is static: a known
  trip count spares the loop a device-to-host read of its condition. Cached per
  (fn, n, copies), so one function compiles once per shape."""
  def many(xs, q, lengths, c):
    shapes = jax.eval_shape(fn, xs[0], q, lengths)
    outs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(_, outs):
      for x in xs:
        s = sum(o[(0,) * o.ndim].astype(jnp.float32) for o in jax.tree.leaves(outs))
        outs = fn(x, q + c * s, lengths)
      return outs

    return lax.fori_loop(0, n, body, outs)
  return jax.jit(many)


# Copies of x rotated in a timed loop until they hold this many bytes of valid
# rows: well over the 50 MB L2 of an H100/H200, so each call reads from HBM.
ROTATE_BYTES = 128 << 20
MAX_COPIES = 4


def copies_for(valid_bytes):
  """Copies of x to rotate so that they hold ROTATE_BYTES of valid rows."""
  return int(min(MAX_COPIES, max(1, -(-ROTATE_BYTES // max(valid_bytes, 1)))))


def per_call_s(fn, args, n, repeats=3, copies=1):
  """(seconds per call, the outputs): the median over `repeats` runs of a looped
  jit of about n calls (ceil(n / copies) rounds over `copies` copies of x),
  divided by the calls; None for 0 repeats. The outputs are those of one plain
  call (the perturbation is 0): the warm-up doubles as the correctness check."""
  x, rest = args[0], tuple(args[1:])
  xs = (x,) + tuple(jnp.array(x, copy=True) for _ in range(copies - 1))
  rounds = -(-n // copies)
  f, c = looped(fn, rounds, copies), jnp.zeros((), jnp.float32)
  outs = jax.block_until_ready(f(xs, *rest, c))      # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(xs, *rest, c))
    times.append(time.perf_counter() - t)
  return (float(np.median(times)) / (rounds * copies) if times else None), outs


_EXECUTABLES = {}  # (fn, argument shapes and dtypes) -> compiled jax.jit(fn)


def compiled(fn, args):
  """jax.jit(fn) lowered and compiled for args' shapes, once per (fn, shapes): the
  executable serves both the single-dispatch timing and the memory analysis."""
  key = (fn, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
  if key not in _EXECUTABLES:
    _EXECUTABLES[key] = jax.jit(fn).lower(*args).compile()
  return _EXECUTABLES[key]


def dispatch_s(fn, args, iters):
  """Median of single calls of the compiled fn (dispatch included)."""
  f = compiled(fn, args)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _temp_mb(fn, args):
  try:
    return compiled(fn, args).memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # not every backend reports memory analysis
    return None


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _tolerance(dtype):
  return 1e-3 if jnp.dtype(dtype) == jnp.float32 else 5e-2


def _inputs(rng, B, L, D, H, dtype):
  x = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  return x, q


def run(shapes, dtypes, kernels, interpret, iters, seed=0, budget_s=None, skipped=None,
        fills=("full", "half"), repeats=3, dispatch=None):
  """Table rows for each shape x dtype x kernel x fill (kernels: a name or a
  list); iters is N, the calls per timed loop. dispatch (default: not
  interpret) also times single dispatches (one more compile per function). A
  kernel that fails or disagrees with XLA gives one row with an "error" and no
  timings. Runs not started because budget_s ran out go to the list skipped."""
  kernels = [kernels] if isinstance(kernels, str) else list(kernels)
  dispatch = not interpret if dispatch is None else dispatch
  rows, skipped = [], ([] if skipped is None else skipped)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for (B, L, D, H), dtype, kernel in itertools.product(shapes, dtypes, kernels):
    key = dict(B=B, L=L, D=D, H=H, dtype=jnp.dtype(dtype).name,
               kernel=kernel + (" (interpret)" if interpret else ""))
    if budget_s is not None and time.perf_counter() - start > budget_s:
      skipped += [dict(key, fill=f) for f in fills]
      continue
    try:
      rows += _measure(key, rng, dtype, kernel, interpret, iters, fills, repeats, dispatch)
    except Exception as e:  # keep the other shapes' numbers
      rows.append(dict(key, fill="-", mode="-", error=f"{type(e).__name__}: {e}"[:300]))
  return rows


def _measure(key, rng, dtype, kernel, interpret, iters, fills, repeats, dispatch):
  B, L, D, H = key["B"], key["L"], key["D"], key["H"]
  peak = peak_gbps(jax.devices()[0])
  x, q = _inputs(rng, B, L, D, H, dtype)
  xla = dict(zip(("fwd", "fwd+bwd"), _functions("xla", False)))
  ker = dict(zip(("fwd", "fwd+bwd"), _functions(kernel, interpret)))
  tol = _tolerance(dtype)
  rows = []
  for fill in fills:
    lengths = fill_lengths(fill, B, L, rng)
    args = (x, q, jnp.asarray(lengths))
    copies = 1 if interpret else copies_for(int(lengths.sum()) * D * x.dtype.itemsize)
    timed = {m: (per_call_s(ker[m], args, iters, repeats, copies),
                 per_call_s(xla[m], args, iters, repeats, copies)) for m in ker}
    # Correctness before any number is kept: kernel vs XLA on these inputs.
    errs = {m: _max_diff(k[1], xl[1]) for m, (k, xl) in timed.items()}
    if not (errs["fwd"] < tol and errs["fwd+bwd"] < 10 * tol):
      raise ValueError(f"kernel disagrees with XLA ({fill} lengths): forward "
                       f"{errs['fwd']:.2e} (tol {tol:g}), grad {errs['fwd+bwd']:.2e} "
                       f"(tol {10 * tol:g})")
    for mode, ((t_k, _), (t_x, _)) in timed.items():
      moved = bytes_moved(lengths, L, D, H, jnp.dtype(dtype).itemsize, mode)
      gbps, xla_gbps = moved / t_k / 1e9, moved / t_x / 1e9
      rows.append(dict(key, fill=fill, mode=mode, calls=-(-iters // copies) * copies,
                       copies=copies, ms=t_k * 1e3,
                       dispatch_ms=(dispatch_s(ker[mode], args, min(iters, 5)) * 1e3
                                    if dispatch else None),
                       xla_ms=t_x * 1e3, mbytes=moved / 1e6, gbps=gbps,
                       xla_gbps=xla_gbps, pct_peak=100 * gbps / peak if peak else None,
                       xla_pct_peak=100 * xla_gbps / peak if peak else None,
                       speedup=t_x / t_k,
                       temp_mb=None if interpret else _temp_mb(ker[mode], args),
                       max_err=errs[mode], error=None))
  return rows


def sweep(shape, dtype, kernel, interpret, iters, grid=None, fill="full", seed=0,
          deadline=None, note=print, repeats=3, on_row=None):
  """Rows of per-call fwd and fwd+bwd times, one per combination of the knobs in
  grid (default: the kernel module's SWEEP, else ours) that `kernel` accepts
  (`kernel_knobs`); knobs it lacks are left out with a note. Each configuration
  is first checked against XLA; one that fails or disagrees gets an "error" and
  no timings. A configuration that would end past deadline (a time.time();
  judged by the one before) is a row with error "skipped (time budget)".
  on_row(row) is called after each row (to save partial results)."""
  if grid is None:  # the kernel module's own sweep when it has one
    grid = getattr(_module(kernel), "SWEEP", SWEEP)
  grid = dict(grid)
  knobs = kernel_knobs(kernel)
  missing = [k for k in grid if k not in knobs]
  if missing:
    note(f"sweep: {kernel} takes no {', '.join(missing)} keyword; swept without it")
  axes = {k: v for k, v in grid.items() if k in knobs}
  B, L, D, H = shape
  rng = np.random.default_rng(seed)
  x, q = _inputs(rng, B, L, D, H, dtype)
  lengths = fill_lengths(fill, B, L, rng)
  args = (x, q, jnp.asarray(lengths))
  want = [per_call_s(f, args, iters, 0)[1] for f in _functions("xla", False)]
  tol, peak = _tolerance(dtype), peak_gbps(jax.devices()[0])
  rows, last = [], 0.0
  for values in itertools.product(*axes.values()):
    row = dict(B=B, L=L, D=D, H=H, dtype=jnp.dtype(dtype).name, fill=fill,
               kernel=kernel + (" (interpret)" if interpret else ""),
               **dict(zip(axes, values)), error=None)
    rows.append(row)
    if deadline is not None and time.time() + last > deadline:
      row["error"] = "skipped (time budget)"
    else:
      t = time.time()
      _sweep_one(row, kernel, interpret, iters, repeats, dict(zip(axes, values)), args, want,
                 lengths, tol, peak)
      last = time.time() - t
    if on_row is not None:
      on_row(row)
  return rows


def _sweep_one(row, kernel, interpret, iters, repeats, knobs, args, want, lengths, tol, peak):
  """Checks and times one sweep configuration into row; errors go to row["error"]."""
  L, D, H = row["L"], row["D"], row["H"]
  try:  # a knob set to None is the kernel's default: the same function as no knob
    fns = _functions(kernel, interpret, **{k: v for k, v in knobs.items() if v is not None})
    copies = 1 if interpret else copies_for(int(lengths.sum()) * D * args[0].dtype.itemsize)
    for mode, f, w in zip(("fwd", "fwd+bwd"), fns, want):
      t, outs = per_call_s(f, args, iters, repeats, copies)
      row[f"{mode}_err"] = err = _max_diff(outs, w)
      if not err < (tol if mode == "fwd" else 10 * tol):
        raise ValueError(f"{mode} disagrees with XLA: max error {err:.2e}")
      gbps = bytes_moved(lengths, L, D, H, jnp.dtype(row["dtype"]).itemsize, mode) / t / 1e9
      row.update({f"{mode}_ms": t * 1e3, f"{mode}_gbps": gbps,
                  f"{mode}_pct_peak": 100 * gbps / peak if peak else None})
  except Exception as e:  # keep the other configurations
    row["error"] = f"{type(e).__name__}: {e}"[:300]


def _fmt(v):
  return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _markdown(head, keys, rows):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    vals = [_fmt(r.get(k)) for k in keys]
    vals.append((r.get("error") or "").replace("|", "/").replace("\n", " "))
    lines.append("| " + " | ".join(vals) + " |")
  return "\n".join(lines)


def table(rows):
  head = ("B", "L", "D", "H", "dtype", "fill", "mode", "kernel", "ms", "dispatch ms",
          "xla_ms", "GB/s", "xla GB/s", "%peak", "xla %peak", "speedup", "temp MB",
          "max err", "error")
  keys = ("B", "L", "D", "H", "dtype", "fill", "mode", "kernel", "ms", "dispatch_ms",
          "xla_ms", "gbps", "xla_gbps", "pct_peak", "xla_pct_peak", "speedup",
          "temp_mb", "max_err")
  return _markdown(head, keys, rows)


def sweep_table(rows):
  knobs = [k for k in SWEEP if any(k in r for r in rows)]
  keys = ["B", "L", "D", "H", "dtype", *knobs, "fwd_ms", "fwd_gbps", "fwd+bwd_ms",
          "fwd+bwd_gbps", "fwd+bwd_pct_peak"]
  head = [k.replace("_gbps", " GB/s").replace("_ms", " ms").replace("_pct_peak", " %peak")
          for k in keys] + ["error"]
  return _markdown(head, keys, rows)


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
  labels = [f"{r['B']}x{r['L']}x{r['D']} H{r['H']} {r['dtype']}\n{r['fill']} {r['mode']}"
            for r in rows]
  pos = np.arange(len(rows))
  ax.bar(pos - 0.2, [r["ms"] for r in rows], 0.4, label=rows[0]["kernel"])
  ax.bar(pos + 0.2, [r["xla_ms"] for r in rows], 0.4, label="xla")
  ax.set_xticks(pos, labels, fontsize=6, rotation=30, ha="right")
  ax.set_ylabel("ms per call (median)")
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
  p.add_argument("--fills", default="full,half", help=f"comma list of {', '.join(FILLS)}")
  p.add_argument("--kernels", default=None,
                 help="comma list of pallas_gpu, pallas_tpu; default: the device's "
                      "kernel (both in interpret mode with --preset cpu-smoke)")
  p.add_argument("--iters", type=int, default=None,
                 help="calls per timed loop (default 50 on an accelerator, 3 on CPU, "
                      "1 for cpu-smoke)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="start no new shape after this many seconds")
  p.add_argument("--sweep", action="store_true",
                 help=f"also sweep the kernel's tuning knobs on {SWEEP_SHAPE} bf16 "
                      "(the preset's first shape on CPU)")
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
  iters = args.iters or (50 if accelerator else 1 if args.preset == "cpu-smoke" else 3)
  if iters < 1:
    p.error("--iters must be >= 1")
  fills = args.fills.split(",")
  if not fills or any(f not in FILLS for f in fills):
    p.error(f"--fills: {args.fills!r}; choose from {FILLS}")
  try:
    dtypes = [jnp.dtype(d).type for d in args.dtypes.split(",")]
  except TypeError as e:
    p.error(f"--dtypes: {e}")
  repeats = 3 if accelerator else 1
  skipped = []
  rows = run(PRESETS[args.preset], dtypes, kernels, not accelerator, iters,
             budget_s=args.budget_s, skipped=skipped, fills=fills, repeats=repeats)
  sweep_rows = []
  if args.sweep:
    shape = SWEEP_SHAPE if accelerator else PRESETS[args.preset][0]
    sweep_rows = sweep(shape, jnp.bfloat16, kernels[0], not accelerator, iters,
                       repeats=repeats)
  meta = dict(device=jax.devices()[0].device_kind, backend=backend,
              jax=jax.__version__, python=platform.python_version(),
              peak_gbps=peak_gbps(jax.devices()[0]), preset=args.preset,
              iters=iters, repeats=repeats, fills=fills, skipped=skipped)
  os.makedirs(args.workdir, exist_ok=True)
  _write_atomic(os.path.join(args.workdir, "results.json"),
                json.dumps(dict(meta=meta, rows=rows, sweep=sweep_rows), indent=1))
  head = (f"device: {meta['device']} ({backend}), jax {jax.__version__}, "
          f"peak {meta['peak_gbps'] or '?'} GB/s, preset {args.preset}, "
          f"{iters} calls per timed loop")
  text = table(rows) + ("\n\nsweep:\n\n" + sweep_table(sweep_rows) if sweep_rows else "")
  _write_atomic(os.path.join(args.workdir, "table.md"), head + "\n\n" + text + "\n")
  timed = [r for r in rows if not r.get("error")]
  plotted = bool(timed) and plot(timed, os.path.join(args.workdir, "bench.png"))
  print(head)
  print(text)
  if skipped:
    print(f"skipped (time budget): {len(skipped)} shape/dtype/kernel/fill runs")
  print(f"wrote {args.workdir}/results.json, table.md" + (", bench.png" if plotted else ""))
  failed = [r for r in rows + sweep_rows if r.get("error")]
  if failed:
    raise SystemExit(f"{len(failed)} of {len(rows) + len(sweep_rows)} rows failed; "
                     "see the error column")
  return rows


if __name__ == "__main__":
  main()

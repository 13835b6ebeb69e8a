"""The stages of `python -m benchmarks.accelerator`, one function each, run in a child process per stage.

Each stage is `fn(p, deadline, out, flush)`: `p` its preset settings, `deadline` a time.time() it must finish
by, `out` a dict it fills with results (JSON-able) and `flush()` saves `out` so far, so that a stage killed
at its time limit still leaves what it measured. Sizes are in PRESETS: "gpu" for one H100/H200, "cpu-smoke"
the same stages at tiny sizes.
"""
from __future__ import annotations

import functools
import gc
import shutil
import tempfile
import time
import traceback
import warnings

import numpy as np

PRESETS = {
    "gpu": {
        "kernels": dict(
            impl="pallas_gpu", interpret=False, dtypes=("bfloat16", "float32"),
            compile=dict(preset="gpu", dtypes=("bfloat16",),
                         extra=[((4, 4096, 600, 20), "bfloat16"), ((8, 4096, 1280, 8), "float32")]),
            cases=[dict(name="lengths 0/1/odd/L", kind="lengths", shape=(4, 1000, 256, 8)),
                   dict(name="packed, empty segments", kind="segments", shape=(4, 1000, 256, 8), segments=8,
                        seg_len=160),
                   dict(name="split-L", kind="lengths", shape=(1, 65536, 1024, 8), lengths=[65529]),
                   dict(name="two head tiles, short segments", kind="segments", shape=(4, 512, 600, 20),
                        segments=96, seg_len=8),
                   dict(name="NaN padding", kind="lengths", shape=(4, 1000, 256, 8), nan=True)],
            bandwidth=dict(shapes=[(8, 4096, 1024, 8), (2, 32768, 1024, 16)], dtypes=("bfloat16",), iters=50,
                           repeats=3),
            sweep=dict(shape=(8, 4096, 1024, 8), dtype="bfloat16", grid=None, iters=50, repeats=3),
            # the Mosaic GPU forward beside Triton (runs on a GPU backend only; see kernel_mosaic)
            mosaic=dict(preset="gpu", iters=50, repeats=3)),
        "bench": dict(preset="gpu", max_len=32768, dtypes=("bfloat16", "float32"), iters=20,
                      fallback=[(8, 4096, 1024, 8), (32, 4096, 1024, 8), (4, 16384, 1024, 16),
                                (64, 1024, 768, 12), (2, 32768, 1280, 16)]),
        "lm": dict(size="150M", steps=100, chunk=10, peak_n=8192),
        "nfe": dict(dataset="WN18RR", dim=1024, batch=128, steps=300, rounds=3, rank=True),
        "fidelity": dict(seq_len=512, batch=64, d_model=512, layers=8, heads=8, head_dim=64, mlp=2048,
                         max_chars=0, eval_rows=1024, lr=2e-3, calib_steps=20, min_steps=200,
                         max_steps=20000, max_epochs=4),
    },
    "cpu-smoke": {
        "kernels": dict(
            impl="pallas_gpu", interpret=True, dtypes=("float32",),
            compile=dict(preset="cpu-smoke", dtypes=("float32",),
                         extra=[((1, 24, 600, 20), "bfloat16"), ((1, 24, 1280, 2), "float32")]),
            # shapes shared between cases, so that each compiles once
            cases=[dict(name="lengths 0/1/odd/L", kind="lengths", shape=(4, 1024, 16, 2)),
                   dict(name="packed, empty segments", kind="segments", shape=(2, 32, 600, 20), segments=12,
                        seg_len=3),
                   dict(name="split-L", kind="lengths", shape=(4, 1024, 16, 2), lengths=[1017, 1024, 600, 3]),
                   dict(name="two head tiles, short segments", kind="segments", shape=(2, 32, 600, 20),
                        segments=12, seg_len=3),
                   dict(name="NaN padding", kind="lengths", shape=(4, 1024, 16, 2), nan=True)],
            bandwidth=dict(shapes=[(2, 40, 16, 2)], dtypes=("float32",), iters=2, repeats=1),
            sweep=dict(shape=(2, 40, 16, 2), dtype="float32", iters=2, repeats=1,
                       grid={"block_l": (16, 32), "num_warps": (4,), "num_stages": (2,)})),
        "bench": dict(preset="cpu-smoke", max_len=32768, dtypes=("float32",), iters=1,
                      fallback=[(2, 64, 16, 4)]),
        "lm": dict(size="tiny", steps=4, chunk=2, peak_n=256),
        "nfe": dict(dataset="WN18RR", dim=8, batch=128, steps=2, rounds=1, rank=False),
        "fidelity": dict(seq_len=32, batch=8, d_model=32, layers=2, heads=2, head_dim=16, mlp=64,
                         max_chars=200_000, eval_rows=32, lr=3e-3, calib_steps=2, min_steps=4,
                         max_steps=12, max_epochs=4),
    },
}

# Dense bf16 matmul peak by device_kind substring (vendor spec sheets, FLOP/s), first match wins.
SPEC_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))

# Pass/fail tolerances against the float64 reference: |err| <= atol * max(1, max |want|) + rtol * |want|.
TOLERANCE = {"float32": {"fwd": 1e-4, "grad": 1e-3}, "bfloat16": {"fwd": 3e-2, "grad": 6e-2}}


# -- stage 1: attention-pool kernels: compile, correctness, bandwidth, knob sweep ----------------------------

def pool_fn(impl: str, interpret):
    """The implementation under test: pool(x, q, lengths=... or segment_ids=..., num_segments=...)."""
    from jaxemb.kernels.attention_pool import attention_pool
    return functools.partial(attention_pool, implementation=impl, interpret=interpret)


def tolerance_ratio(actual, want, tol: float) -> tuple[float, float]:
    """(max |actual - want|, max of |actual - want| / (tol * max(1, max|want|) + tol * |want|)); <= 1 passes.
    NaN anywhere gives inf."""
    a = np.asarray(np.asarray(actual, np.float32), np.float64)
    w = np.asarray(want, np.float64)
    if not np.isfinite(a).all():
        return float("inf"), float("inf")
    err = np.abs(a - w)
    bound = tol * max(1.0, float(np.abs(w).max(initial=0))) + tol * np.abs(w)
    return float(err.max(initial=0)), float((err / bound).max(initial=0))


def case_inputs(rng, spec: dict):
    """x (float64; NaN in the padding when spec["nan"]), q, the call's keyword arguments (numpy) and the (B, L)
    padding mask (positions no range covers) of one correctness case. kind "lengths": spec["lengths"], by
    default [L, 1, odd, 0] over the rows; kind "segments": spec["segments"] ids per row in runs of 1 to
    spec["seg_len"] positions, every third id empty, row 1 all padding."""
    B, L, D, H = spec["shape"]
    x = rng.normal(size=(B, L, D))
    q = rng.normal(size=(H, D)) / np.sqrt(D)
    if spec["kind"] == "lengths":
        pattern = spec.get("lengths") or [L, 1, (L // 2) | 1, 0]
        lengths = np.array([pattern[b % len(pattern)] for b in range(B)], np.int32)
        kw, pad = dict(lengths=lengths), np.arange(L)[None, :] >= lengths[:, None]
    elif spec["kind"] == "segments":
        S = spec["segments"]
        ids = np.full((B, L), -1, np.int32)
        for b in range(B):
            if b == 1:
                continue                                   # a row of padding only
            runs = rng.integers(1, spec["seg_len"] + 1, size=S)
            runs[1::3] = 0                                 # empty segments
            ends = np.minimum(np.cumsum(runs), L)
            for s, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
                ids[b, start:end] = s
        kw, pad = dict(segment_ids=ids, num_segments=S), ids < 0
    else:
        raise ValueError(f"case {spec.get('name')!r}: kind must be 'lengths' or 'segments', got {spec['kind']!r}")
    if spec.get("nan"):
        x[pad] = np.nan
    return x, q, kw, pad


def _head_tiles(impl, L, D, H, itemsize):
    """Head tiles the GPU kernel uses for a shape (None when its config() cannot say)."""
    try:
        from jaxemb.kernels.attention_pool import pallas_gpu
        cfg = pallas_gpu.config(L, D, H, itemsize)  # (block_l, head_tile, dim_p, heads_p, ...)
        tiles = getattr(cfg, "heads_p", cfg[3]) // getattr(cfg, "head_tile", cfg[1])
        return int(tiles) if impl == "pallas_gpu" else None
    except Exception:  # another kernel, or a config() of another shape
        return None


def _fwd_bwd(pool, num_segments):
    """jit of (x, q, g, arrays) -> (pooled output f32, dx, dq) for cotangent g."""
    import jax
    import jax.numpy as jnp
    static = {} if num_segments is None else dict(num_segments=num_segments)

    def f(x, q, g, arrays):
        y, vjp = jax.vjp(lambda x, q: pool(x, q, **arrays, **static).astype(jnp.float32), x, q)
        return (y,) + vjp(g)
    return jax.jit(f)


def check_case(spec, dtype, x64, q64, kw, pad, g64, fns, tolerance=None) -> dict:
    """Kernel vs the float32 XLA reference (on x with the padding zeroed) for one case: max errors and tolerance
    ratios of forward, dx and dq, the largest |dx| in the padding (must be exactly 0) and pass/FAIL."""
    import jax.numpy as jnp
    tol = (tolerance or TOLERANCE)[dtype]
    arrays = {k: jnp.asarray(v) for k, v in kw.items() if k != "num_segments"}
    kernel, ref = fns(kw.get("num_segments"))
    x = jnp.asarray(x64, dtype)
    q, g = jnp.asarray(q64, jnp.float32), jnp.asarray(g64, jnp.float32)
    got = [np.asarray(a, np.float32) for a in kernel(x, q, g, arrays)]
    x_ref = jnp.where(jnp.asarray(pad)[..., None], 0, x).astype(jnp.float32)
    want = [np.asarray(a, np.float64) for a in ref(x_ref, q, g, arrays)]
    res = {}
    for name, a, w, t in zip(("fwd", "dx", "dq"), got, want, (tol["fwd"], tol["grad"], tol["grad"])):
        res[f"{name}_max_err"], res[f"{name}_tol_ratio"] = tolerance_ratio(a, w, t)
    dx_pad = got[1][pad]
    res["dx_pad_max"] = float(np.abs(dx_pad).max(initial=0)) if np.isfinite(dx_pad).all() else float("inf")
    ok = max(res[f"{k}_tol_ratio"] for k in ("fwd", "dx", "dq")) <= 1 and res["dx_pad_max"] == 0
    res["status"] = "pass" if ok else "FAIL"
    return res


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def kernel_compile(p, deadline, out, flush):
    """Compiles forward+backward for the bench presets and the extra shapes; compile seconds, temporary memory,
    how many Pallas kernel calls the compiled program holds, and the warnings (an XLA fallback says so)."""
    import jax
    import jax.numpy as jnp
    from jaxemb.kernels import bench as kb
    pool = pool_fn(p["impl"], p["interpret"])
    grad = jax.grad(lambda x, q, n: jnp.sum(pool(x, q, lengths=n).astype(jnp.float32) ** 2), argnums=(0, 1))
    c = p["compile"]
    todo = [(tuple(s), d) for s in kb.PRESETS[c["preset"]] for d in c["dtypes"]]
    todo += [(tuple(s), d) for s, d in c["extra"]]
    for (B, L, D, H), dtype in todo:
        row = dict(B=B, L=L, D=D, H=H, dtype=dtype)
        out["compile"].append(row)
        if time.time() > deadline:
            row["status"] = "skipped (time budget)"
            continue
        try:
            specs = (jax.ShapeDtypeStruct((B, L, D), jnp.dtype(dtype)), jax.ShapeDtypeStruct((H, D), jnp.float32),
                     jax.ShapeDtypeStruct((B,), jnp.int32))
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compiled = jax.jit(grad).lower(*specs).compile()
            row.update(status="ok", compile_s=time.perf_counter() - t,
                       warnings=sorted({str(w.message)[:200] for w in caught})[:3])
            text = compiled.as_text() or ""
            row["kernel_calls"] = sum(text.count(k) for k in ("xla.gpu.triton", "mosaic_gpu", "tpu_custom_call"))
            try:
                row["temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
            except Exception:  # not every backend reports it
                row["temp_mb"] = None
        except Exception as e:  # keep the other shapes
            row.update(status="error", error=_error(e))
        flush()


def kernel_cases(p, deadline, out, flush):
    """Correctness cases (p["cases"]) x dtypes against the float32 XLA reference; each records its own error."""
    kernel, ref = pool_fn(p["impl"], p["interpret"]), pool_fn("xla", False)
    cache = {}

    def fns(num_segments):  # one jit per (pool, num_segments): cases of one shape compile once
        if num_segments not in cache:
            cache[num_segments] = (_fwd_bwd(kernel, num_segments), _fwd_bwd(ref, num_segments))
        return cache[num_segments]

    for dtype in p["dtypes"]:  # every case in the first dtype before any in the second
        for i, spec in enumerate(p["cases"]):
            B, L, D, H = spec["shape"]
            case = dict(name=spec["name"], kind=spec["kind"], B=B, L=L, D=D, H=H, dtype=dtype,
                        nan_padding=bool(spec.get("nan")),
                        head_tiles=_head_tiles(p["impl"], L, D, H, 2 if dtype == "bfloat16" else 4))
            out["cases"].append(case)
            if time.time() > deadline:
                case["status"] = "skipped (time budget)"
                continue
            try:
                rng = np.random.default_rng(i)  # the same inputs for every dtype
                x64, q64, kw, pad = case_inputs(rng, spec)
                S = kw.get("num_segments")
                g64 = rng.normal(size=(B, H, D) if S is None else (B, S, H, D))
                t = time.perf_counter()
                case.update(check_case(spec, dtype, x64, q64, kw, pad, g64, fns))
                case["seconds"] = time.perf_counter() - t
            except Exception as e:  # keep the other cases
                case.update(status="error", error=_error(e))
            flush()


def kernel_bandwidth(p, deadline, out, flush):
    """jaxemb.kernels.bench rows (looped per-call time, GB/s of the bytes moved, % of HBM peak, XLA) at full
    and half lengths."""
    import jax.numpy as jnp
    from jaxemb.kernels import bench as kb
    b = p["bandwidth"]
    for shape in b["shapes"]:
        for dtype in b["dtypes"]:
            if time.time() > deadline:
                out["bandwidth"].append(dict(zip("BLDH", shape), dtype=dtype, fill="-", mode="-",
                                             error="skipped (time budget)"))
            else:  # kb.run records a failing shape as a row with an error
                out["bandwidth"] += kb.run([tuple(shape)], [jnp.dtype(dtype).type], p["impl"], p["interpret"],
                                           b["iters"], fills=("full", "half"), repeats=b["repeats"])
            out["bandwidth_table"] = kb.table(out["bandwidth"])
            flush()


def kernel_sweep(p, deadline, out, flush):
    """jaxemb.kernels.bench.sweep over the knobs the kernel takes (block rows x warps x stages)."""
    import jax.numpy as jnp
    from jaxemb.kernels import bench as kb
    s = p["sweep"]

    def saved(row):
        out["sweep"].append(row)
        out["sweep_table"] = kb.sweep_table(out["sweep"])
        flush()

    kb.sweep(tuple(s["shape"]), jnp.dtype(s["dtype"]).type, p["impl"], p["interpret"], s["iters"],
             grid=s.get("grid"), deadline=deadline, note=out["notes"].append, repeats=s["repeats"],
             on_row=saved)


def kernel_mosaic(p, deadline, out, flush):
    """The Mosaic GPU forward (implementation="mosaic_gpu", bf16) at the bench presets: compile seconds, max
    error against the fp32 XLA forward for lengths [L, 1, odd, 0] (pass/FAIL at the bf16 forward tolerance),
    then looped per-call time at full lengths beside the Triton forward. Rows go to out["mosaic"], one line each
    to out["notes"] (the markdown shows those); every failure is that row's error."""
    import jax
    import jax.numpy as jnp
    from jaxemb.kernels import bench as kb
    m = p["mosaic"]
    mosaic = kb._functions("mosaic_gpu", False)[0]
    triton = kb._functions(p["impl"], False)[0]
    ref = kb._functions("xla", False)[0]
    for i, (B, L, D, H) in enumerate(kb.PRESETS[m["preset"]]):
        row = dict(B=B, L=L, D=D, H=H, dtype="bfloat16")
        out["mosaic"].append(row)
        if time.time() > deadline:
            row["status"] = "skipped (time budget)"
            continue
        try:
            rng = np.random.default_rng(i)
            x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.bfloat16)
            q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
            pattern = [L, 1, (L // 2) | 1, 0]
            lengths = jnp.asarray([pattern[b % 4] for b in range(B)], jnp.int32)
            t = time.perf_counter()
            jax.jit(mosaic).lower(x, q, lengths).compile()
            row["compile_s"] = time.perf_counter() - t
            got = jax.jit(mosaic)(x, q, lengths)
            want = jax.jit(ref)(x.astype(jnp.float32), q, lengths)
            row["fwd_max_err"], row["fwd_tol_ratio"] = tolerance_ratio(got, want, TOLERANCE["bfloat16"]["fwd"])
            row["status"] = "pass" if row["fwd_tol_ratio"] <= 1 else "FAIL"
            full = jnp.full((B,), L, jnp.int32)
            copies = kb.copies_for(B * L * D * 2)
            for name, fn in (("mosaic", mosaic), ("triton", triton)):
                try:  # a Triton failure keeps the Mosaic time
                    sec, _ = kb.per_call_s(fn, (x, q, full), m["iters"], m["repeats"], copies)
                    row[f"{name}_ms"] = 1e3 * sec
                    row[f"{name}_gbps"] = kb.bytes_moved([L] * B, L, D, H, 2, "fwd") / sec / 1e9
                except Exception as e:
                    row[f"{name}_error"] = _error(e)
        except Exception as e:  # keep the other shapes
            row.update(status="error", error=_error(e))
        out["notes"].append(
            f"mosaic_gpu fwd ({B}, {L}, {D}, {H}) bf16: {row['status']}"
            + (f" ({row['error']})" if row.get("error") else "")
            + "".join(f", {k} {row[k]:.4g}" for k in ("compile_s", "fwd_max_err", "mosaic_ms", "triton_ms",
                                                       "mosaic_gbps", "triton_gbps") if row.get(k) is not None)
            + "".join(f", {k}: {row[k]}" for k in ("mosaic_error", "triton_error") if row.get(k)))
        flush()


# The kernels stage's steps in order, each with its part of the stage time left when it starts.
KERNEL_STEPS = (("compile", kernel_compile, 0.2), ("cases", kernel_cases, 0.35),
                ("bandwidth", kernel_bandwidth, 0.5), ("sweep", kernel_sweep, 1.0))
# Run before the sweep (the sweep takes what is left) where p["mosaic"] is set and the backend is a GPU.
MOSAIC_STEP = ("mosaic_gpu", kernel_mosaic, 0.3)


def kernel_steps(p, backend):
    """KERNEL_STEPS, plus MOSAIC_STEP before the sweep on a GPU when the preset asks for it."""
    if not p.get("mosaic") or backend not in ("gpu", "cuda"):
        return KERNEL_STEPS
    return KERNEL_STEPS[:-1] + (MOSAIC_STEP,) + KERNEL_STEPS[-1:]


def kernels(p, deadline, out, flush):
    import jax
    from jaxemb.kernels import bench as kb
    out.update(implementation=p["impl"], interpret=p["interpret"], tolerance=TOLERANCE,
               peak_gbps=kb.peak_gbps(jax.devices()[0]), steps={}, compile=[], cases=[], bandwidth=[],
               sweep=[], notes=[], mosaic=[])
    for name, step, part in kernel_steps(p, jax.default_backend()):  # a failing step loses nothing else
        t = time.time()
        try:
            step(p, t + part * max(0.0, deadline - t), out, flush)
            out["steps"][name] = dict(status="ok", seconds=time.time() - t)
        except Exception as e:
            out["steps"][name] = dict(status="error", seconds=time.time() - t, error=_error(e),
                                      traceback=traceback.format_exc()[-2000:])
        flush()
    checked = [c for c in out["cases"] if c["status"] in ("pass", "FAIL")]
    out["passed"] = sum(c["status"] == "pass" for c in checked)
    out["checked"] = len(checked)
    out["all_pass"] = bool(checked) and out["passed"] == len(checked) == len(out["cases"])


# -- stage 2: jaxemb.kernels.bench timing table ------------------------------------------------------------------

def bench(p, deadline, out, flush):
    import jax
    import jax.numpy as jnp
    from jaxemb.kernels import bench as kb
    shapes = [s for s in getattr(kb, "PRESETS", {}).get(p["preset"], p["fallback"]) if s[1] <= p["max_len"]]
    backend = jax.default_backend()
    kernel = "pallas_tpu" if backend == "tpu" else "pallas_gpu"  # the GPU kernel (interpreted on CPU)
    interpret = backend not in ("gpu", "tpu")
    out.update(shapes=[list(s) for s in shapes], kernel=kernel, interpret=interpret,
               peak_gbps=kb.peak_gbps(jax.devices()[0]), rows=[], errors=[])
    for shape in shapes:  # one shape at a time, so that what was measured is saved before a kill
        for dtype in p["dtypes"]:
            if time.time() > deadline:
                out["errors"].append(f"{shape} {dtype}: skipped (time budget)")
                continue
            try:
                rows = kb.run([shape], [jnp.dtype(dtype).type], kernel, interpret, p["iters"])
            except (Exception, SystemExit) as e:
                rows = [dict(zip("BLDH", shape), dtype=dtype, mode="-", error=f"{type(e).__name__}: {e}")]
            out["rows"] += [r for r in rows if not r.get("error")]
            out["errors"] += [f"{shape} {dtype}: {r['error']}" for r in rows if r.get("error")]
            flush()
    out["table"] = kb.table(out["rows"]) if out["rows"] else ""


# -- stage 3: the 150M LM in bf16: tokens/s and MFU ---------------------------------------------------------

def spec_bf16_flops(device_kind: str):
    return next((v for k, v in SPEC_BF16_FLOPS if k.lower() in device_kind.lower()), None)


def lm(p, deadline, out, flush):
    import jax
    import jax.numpy as jnp
    from benchmarks import train_throughput as tt
    cfg = tt.configs([p["size"]], big_batch=4)[p["size"]]
    cfg.train.compute_dtype = "bfloat16"
    peak = tt.matmul_peak(jnp.bfloat16, n=p["peak_n"])
    spec = spec_bf16_flops(jax.devices()[0].device_kind)
    out.update(config=p["size"], batch=cfg.train.batch_size, seq=cfg.data.seq_len, dtype="bfloat16",
               optimizer=cfg.optim.name, measured_bf16_peak_flops=peak, spec_bf16_peak_flops=spec)
    flush()
    t = time.perf_counter()
    step, info = tt.jax_runner(cfg)  # compile + 2 warm-up steps
    out["compile_and_warmup_s"] = time.perf_counter() - t
    tokens = cfg.train.batch_size * cfg.data.seq_len
    chunks, done = [], 0
    while done < p["steps"] and (not chunks or time.time() + 2 * chunks[-1] * p["chunk"] < deadline):
        t = time.perf_counter()
        for _ in range(p["chunk"]):
            step()
        chunks.append((time.perf_counter() - t) / p["chunk"])
        done += p["chunk"]
    j = info()
    step_s = float(np.median(chunks))
    fpt = tt.flops_per_token(cfg.model, cfg.data.seq_len, j["params"])
    out.update(params=j["params"], timed_steps=done, step_ms=1e3 * step_s, tokens_per_s=tokens / step_s,
               mfu=fpt * tokens / step_s / peak, mfu_spec=fpt * tokens / step_s / spec if spec else None,
               loss=j["loss"], peak_memory_gib=j["peak_memory_bytes"] / 2 ** 30)


# -- stage 4: NFE-1 at the paper config on WN18RR ---------------------------------------------------------

def nfe(p, deadline, out, flush):
    from benchmarks import kge_throughput as kt
    from jaxemb.data import kg
    cfg = kt.bench_config(p["dataset"], "nfe1", p["dim"], p["batch"])
    if p.get("kg_root"):
        cfg.data.root = p["kg_root"]
    graph = kg.load(cfg.data.source, cfg.data.root)
    workdir = tempfile.mkdtemp(prefix="accel_nfe_")
    try:
        out.update(kt.measure(cfg, graph, p["steps"], p["rounds"], with_torch=False, rank=p["rank"],
                              workdir=workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- stage 5: standard vs lexinvariant LM trained for the time left ----------------------------------------

def fidelity_config(p):
    from experiments.configs.lexinvariant import get_config
    cfg = get_config("default")
    cfg.data.update(seq_len=p["seq_len"], max_chars=p["max_chars"], eval_rows=p["eval_rows"])
    cfg.model.update(d_model=p["d_model"], num_layers=p["layers"], num_heads=p["heads"], head_dim=p["head_dim"],
                     mlp_dim=p["mlp"])
    cfg.train.update(batch_size=p["batch"], compute_dtype="bfloat16", eval_every=0, checkpoint_every=0,
                     log_every=100, progress=False)
    cfg.optim.update(lr=p["lr"], end_lr=p["lr"] / 10)
    return cfg


def fidelity(p, deadline, out, flush):
    from benchmarks import train_throughput as tt
    from experiments import harness
    from experiments import lexinvariant as lx
    from jaxemb.models.lexinvariant import parameter_count
    cfg = fidelity_config(p)
    workdir = tempfile.mkdtemp(prefix="accel_fidelity_")
    try:
        t = time.perf_counter()
        data = lx.prepare(cfg, workdir)
        out.update(data=cfg.data.source, seq_len=cfg.data.seq_len, batch=cfg.train.batch_size,
                   train_rows=int(data.train.num_rows), eval_rows=int(data.rows.num_rows),
                   prepare_s=time.perf_counter() - t)
        # Time the (slower) lexinvariant step on random tokens, then give both models the same step count.
        probe = harness.with_settings(cfg, **{"model.vocab_size": data.derived["vocab_size"],
                                              "model.kind": "lexinvariant"})
        t = time.perf_counter()
        step, _ = tt.jax_runner(probe, warmup=1)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(p["calib_steps"]):
            step()
        step_s = (time.perf_counter() - t) / p["calib_steps"]
        del step
        gc.collect()
        per_model = (deadline - time.time() - 10) / 2 - 1.5 * compile_s
        most = min(p["max_steps"], p["max_epochs"] * data.train.num_batches)  # more epochs would overfit
        steps = int(min(most, max(p["min_steps"], 0.85 * per_model / step_s)))
        cfg.train.steps = steps
        cfg.optim.warmup_steps = max(1, min(cfg.optim.warmup_steps * 5, steps // 10))
        out.update(calibration_step_ms=1e3 * step_s, calibration_compile_s=compile_s, steps=steps,
                   epochs=steps / data.train.num_batches,
                   tokens_per_model=steps * cfg.train.batch_size * cfg.data.seq_len, models={})
        flush()
        losses = {}
        for kind in cfg.study.kinds:  # standard, lexinvariant
            t = time.perf_counter()
            variant = lx.train_kind(cfg, kind, data, workdir)
            losses[kind] = lx.position_losses(variant, data.rows)
            out["models"][kind] = {"parameters": parameter_count(variant.params),
                                   "train_seconds": variant.result.train_seconds,
                                   "total_seconds": time.perf_counter() - t,
                                   "mean_ppl": float(np.exp(losses[kind].mean()))}
            flush()
        out["table"] = lx.bin_table(losses, cfg.study.bins)
        out["loss_by_position"] = {k: v.tolist() for k, v in losses.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


STAGES = {"kernels": kernels, "bench": bench, "lm": lm, "nfe": nfe, "fidelity": fidelity}

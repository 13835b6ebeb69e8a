"""The stages of `python -m benchmarks.accelerator`, one function each, run in a child process per stage.

Each stage is `fn(p, deadline, out, flush)`: `p` its preset settings, `deadline` a time.time() it must finish
by, `out` a dict it fills with results (JSON-able) and `flush()` saves `out` so far, so that a stage killed
at its time limit still leaves what it measured. Sizes are in PRESETS: "gpu" for one H100/H200, "cpu-smoke"
the same stages at tiny sizes.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import time

import numpy as np

PRESETS = {
    "gpu": {
        "kernels": dict(impl="pallas_gpu", interpret=False, dtypes=("bfloat16", "float32"),
                        shapes=[(4, 1000, 256, 8), (2, 8192, 512, 16), (8, 300, 128, 64)]),
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
        "kernels": dict(impl="pallas_gpu", interpret=True, dtypes=("bfloat16", "float32"),
                        shapes=[(2, 40, 16, 3)]),
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


# -- float64 references ------------------------------------------------------------------------------------

def range_masks(L: int, lengths=None, segment_ids=None, num_segments: int = 1) -> np.ndarray:
    """(B, S, L) bool: the positions each pooled row covers (S = 1 for lengths)."""
    if segment_ids is None:
        return (np.arange(L)[None, :] < np.asarray(lengths)[:, None])[:, None, :]
    ids = np.asarray(segment_ids)
    return ids[:, None, :] == np.arange(num_segments)[None, :, None]


def pool_and_grads_f64(x, q, masks, g):
    """Attention pooling and its gradients in float64 from the definition. x (B, L, D), q (H, D), masks
    (B, S, L), g (B, S, H, D) the cotangent of the output. Returns out (B, S, H, D), dx, dq."""
    x, q, g = (np.asarray(np.asarray(a, np.float32), np.float64) for a in (x, q, g))
    B, S = masks.shape[:2]
    out, dx, dq = np.zeros(g.shape), np.zeros(x.shape), np.zeros(q.shape)
    for b in range(B):
        for s in range(S):
            m = masks[b, s]
            if not m.any():
                continue
            xs = x[b, m]                                      # (n, D)
            sc = q @ xs.T                                     # (H, n)
            p = np.exp(sc - sc.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            o = p @ xs
            out[b, s] = o
            gs = g[b, s]
            ds = p * (gs @ xs.T - np.sum(gs * o, 1, keepdims=True))  # d loss / d scores
            dx[b, m] += p.T @ gs + ds.T @ q
            dq += ds @ xs
    return out, dx, dq


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


def random_case(rng, B, L, D, H, mode, max_segments=4):
    """Inputs of one check: x, q (numpy float64), lengths or segment ids mixing empty, full and ragged rows."""
    x = rng.normal(size=(B, L, D))
    q = rng.normal(size=(H, D)) / np.sqrt(D)
    if mode == "lengths":
        lengths = np.array([[0, L, 1][b] if b < 3 else rng.integers(1, L) for b in range(B)], np.int32)
        return x, q, dict(lengths=lengths), range_masks(L, lengths=lengths)
    ids = np.full((B, L), -1, np.int32)
    for b in range(B):
        n = L if b == 0 else int(rng.integers(0, L + 1))
        cuts = np.sort(rng.integers(0, n + 1, size=max_segments - 1))
        ids[b, :n] = np.repeat(np.arange(max_segments), np.diff(np.concatenate([[0], cuts, [n]])))
    kw = dict(segment_ids=ids, num_segments=max_segments)
    return x, q, kw, range_masks(L, segment_ids=ids, num_segments=max_segments)


# -- stage 1: attention-pool kernels against float64 -----------------------------------------------------

def kernels(p, deadline, out, flush):
    import jax
    import jax.numpy as jnp
    from jaxemb.kernels.attention_pool import attention_pool
    rng = np.random.default_rng(0)
    out.update(implementation=p["impl"], interpret=p["interpret"], tolerance=TOLERANCE, cases=[])
    for (B, L, D, H) in p["shapes"]:
        for mode in ("lengths", "segments"):
            x64, q64, kw, masks = random_case(rng, B, L, D, H, mode)
            g64 = rng.normal(size=(B, masks.shape[1], H, D))
            for dtype in p["dtypes"]:
                case = dict(B=B, L=L, D=D, H=H, mode=mode, dtype=dtype)
                if time.time() > deadline:
                    out["cases"].append(dict(case, status="skipped (time budget)"))
                    continue
                x = jnp.asarray(x64, dtype)
                q = jnp.asarray(q64, jnp.float32)
                g = jnp.asarray(g64 if mode == "segments" else g64[:, 0], jnp.float32)
                kwj = {k: (jnp.asarray(v) if k != "num_segments" else v) for k, v in kw.items()}

                def pool(x, q):
                    return attention_pool(x, q, implementation=p["impl"], interpret=p["interpret"], **kwj)

                def fwd_bwd(x, q, g):
                    y, vjp = jax.vjp(lambda x, q: pool(x, q).astype(jnp.float32), x, q)
                    return (y,) + vjp(g)

                t = time.perf_counter()
                y, dx, dq = jax.block_until_ready(jax.jit(fwd_bwd)(x, q, g))
                seconds = time.perf_counter() - t
                want, wdx, wdq = pool_and_grads_f64(x, q, masks, g64 if mode == "segments" else g64[:, :1])
                if mode == "lengths":
                    want = want[:, 0]
                tol = TOLERANCE[dtype]
                errs = {"fwd": tolerance_ratio(y, want, tol["fwd"]), "dx": tolerance_ratio(dx, wdx, tol["grad"]),
                        "dq": tolerance_ratio(dq, wdq, tol["grad"])}
                case.update({f"{k}_max_err": e for k, (e, _) in errs.items()})
                case.update({f"{k}_tol_ratio": r for k, (_, r) in errs.items()})
                case.update(status="pass" if max(r for _, r in errs.values()) <= 1 else "FAIL",
                            compile_run_s=seconds)
                out["cases"].append(case)
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

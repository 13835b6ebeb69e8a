"""ESM2 encoder speed: jaxemb against Hugging Face transformers' EsmModel in PyTorch (CPU), same weights.

    python -m benchmarks.esm2_speed                       # t6_8M at 8x256, t33_650M at 1x256, memory at L=2000
    python -m benchmarks.esm2_speed --quick               # t6_8M at 2x128, memory at L=512: a few minutes
    python -m benchmarks.esm2_speed --shapes t6_8M --reps 20 --no-memory --note /tmp/esm2.md

A random EsmModel (no pooler) is built from an EsmConfig, saved with save_pretrained and read back with
jaxemb's load_pretrained, so both frameworks run the same weights on the same tokens (<cls> residues <eos>,
no padding, attention mask passed). Forward (torch under no_grad) and forward+backward (gradient of
mean(last_hidden_state^2) w.r.t. every parameter) are timed in one process, alternating jaxemb and
PyTorch repetitions (medians reported); torch runs with as many threads as the machine has cores, as XLA
does, and by default also with 1 (OpenMP's busy-waiting threads can be far slower on a loaded machine).
Peak memory: each framework and mode in its own subprocess at L = 2000 (the length ESM2 inputs are truncated
to in the PPI paper): the process peak (VmHWM, includes JAX compilation) and the peak of one step after
warm-up (VmHWM reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.common import ONEDNN_MODES, host, set_onednn


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    d: int
    heads: int
    mlp: int
    batch: int
    seq: int  # tokens per row, <cls> and <eos> included

    def hf_config(self):
        import transformers
        return transformers.EsmConfig(
            vocab_size=33, hidden_size=self.d, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            intermediate_size=self.mlp, position_embedding_type="rotary", token_dropout=True, mask_token_id=32,
            pad_token_id=1, layer_norm_eps=1e-5, emb_layer_norm_before=False, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, max_position_embeddings=max(1026, self.seq + 2))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"t6_8M": dict(layers=6, d=320, heads=20, mlp=1280), "t33_650M": dict(layers=33, d=1280, heads=20, mlp=5120)}


def tokens(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """(batch, seq) ids: <cls>=0, random standard residues (ids 4..23), <eos>=2."""
    if seq < 3:
        raise ValueError(f"seq={seq}; expected at least 3 tokens (<cls>, a residue, <eos>)")
    ids = np.random.default_rng(seed).integers(4, 24, size=(batch, seq))
    ids[:, 0], ids[:, -1] = 0, 2
    return ids.astype(np.int32)


def torch_model(shape: Shape, seed: int = 0):
    import torch
    import transformers
    torch.manual_seed(seed)
    return transformers.EsmModel(shape.hf_config(), add_pooling_layer=False).eval()


# ---------------------------------------------------------------- the two frameworks, one step each

def jax_steps(path: str, ids: np.ndarray, attention_chunk: int = 0):
    """{'fwd': f, 'fwd+bwd': g} for jaxemb's ESM2 loaded from the checkpoint at `path`; each runs one
    step to completion and returns its outputs (last hidden state; loss and gradients). attention_chunk:
    queries per attention chunk (Esm2Config.attention_chunk; 0 = the whole (L, L) scores)."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    from jaxemb.models import esm2 as E
    from jaxemb.train.constants import unbox
    cfg, params = E.load_pretrained(path)
    model = E.esm2(dataclasses.replace(cfg, attention_chunk=attention_chunk))
    params = jax.device_put(unbox(params))
    ids_j, mask_j = jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)

    def loss(p):
        return jnp.mean(jnp.square(E.encode(model, p, ids_j, mask_j)["last_hidden_state"]))

    grad = jax.jit(jax.value_and_grad(loss))
    return {"fwd": lambda: jax.block_until_ready(E.encode(model, params, ids_j, mask_j)["last_hidden_state"]),
            "fwd+bwd": lambda: jax.block_until_ready(grad(params))}


def torch_steps(model, ids: np.ndarray, threads: int | None = None):
    """The same two steps for the PyTorch model, each run with `threads` intra-op threads (None: leave
    torch's setting); fwd+bwd leaves no gradients behind (set to None after)."""
    import torch
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.ones(ids.shape, dtype=torch.long)

    def fwd():
        if threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            return model(ids_t, attention_mask=mask_t).last_hidden_state

    def fwd_bwd():
        if threads:
            torch.set_num_threads(threads)
        loss = model(ids_t, attention_mask=mask_t).last_hidden_state.pow(2).mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


class Pair:
    """jaxemb and PyTorch on the same random weights and tokens for one shape; `torch` holds the PyTorch
    steps per thread count (default: as many threads as cores, as XLA uses)."""

    def __init__(self, shape: Shape, seed: int = 0, torch_threads: tuple = ()):
        self.shape = shape
        self.ids = tokens(shape.batch, shape.seq, seed)
        self.model = torch_model(shape, seed)
        path = tempfile.mkdtemp(prefix="jaxemb-esm2-bench-")
        try:
            self.model.save_pretrained(path)
            self.jax = jax_steps(path, self.ids)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        threads = dict.fromkeys(torch_threads or (os.cpu_count(),))  # ordered, no repeats
        self.torch = {n: torch_steps(self.model, self.ids, n) for n in threads}
        self.params = sum(p.numel() for p in self.model.parameters())

    def outputs(self) -> dict:
        """{what: (jaxemb, PyTorch)} as numpy: last hidden state, loss, gradient of the embedding table."""
        t = next(iter(self.torch.values()))
        h_j, h_t = self.jax["fwd"](), t["fwd"]()
        (loss_j, g_j), (loss_t, g_t) = self.jax["fwd+bwd"](), t["fwd+bwd"]()
        return {"last_hidden_state": (np.asarray(h_j), h_t.numpy()), "loss": (float(loss_j), loss_t.item()),
                "grad_embedding": (np.asarray(g_j["embed"]["embedding"]),
                                   g_t["embeddings.word_embeddings.weight"].numpy())}


def measure(pair: Pair, reps: int) -> list:
    """Rows (one per pass) of tokens/s, timed over `reps` interleaved rounds (jax fwd, torch fwd at each
    thread count, jax fwd+bwd, torch fwd+bwd ...) after one warm-up call each (JAX: compilation); medians.
    `ratio`: jaxemb over the fastest PyTorch setting; `ratio_cores`: over PyTorch with one thread per core
    (None when that was not timed)."""
    from benchmarks.train_throughput import interleaved_times
    if reps < 1:
        raise ValueError(f"reps={reps}; expected at least 1")
    out = pair.outputs()  # the first warm-up
    h_j, h_t = out["last_hidden_state"]
    diff = float(np.max(np.abs(h_j - h_t)))
    steps = {}
    for mode in ("fwd", "fwd+bwd"):
        steps[("jax", mode)] = pair.jax[mode]
        for n, t in pair.torch.items():
            steps[(n, mode)] = t[mode]
    for step in list(steps.values())[1:]:
        step()  # the rest of the warm-up (other thread counts)
    times = interleaved_times(steps, reps, reps)
    s = pair.shape
    n_tok = s.batch * s.seq
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        j = float(np.median(times[("jax", mode)]))
        by_threads = {n: n_tok / float(np.median(times[(n, mode)])) for n in pair.torch}
        best = max(by_threads, key=by_threads.get)
        cores = by_threads.get(os.cpu_count())
        rows.append({"shape": s.name, "layers": s.layers, "d": s.d, "heads": s.heads, "mlp": s.mlp,
                     "params": pair.params, "batch": s.batch, "seq": s.seq, "mode": mode, "reps": reps,
                     "jax_s": j, "jax_tok_s": n_tok / j, "torch_tok_s_by_threads": by_threads,
                     "torch_best_threads": best, "torch_tok_s": by_threads[best],
                     "ratio": n_tok / j / by_threads[best], "ratio_cores": n_tok / j / cores if cores else None,
                     "max_abs_diff": diff})
    return rows


# ---------------------------------------------------------------- peak memory, one subprocess per run

def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM). Not ru_maxrss: after fork + exec that starts at the
    parent's RSS at the fork, so a small child of a large parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line")


def step_peak(step) -> int:
    """Peak RSS in bytes during one call of step(): the high-water mark reset first (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return peak_rss()


def memory_child(framework: str, mode: str, path: str, batch: int, seq: int, threads: int = 0,
                 chunk: int = 0) -> dict:
    """In this process: load the checkpoint at `path` in one framework, run one `mode` step (warm-up),
    then another; the loaded RSS, the process peak and the peak of the second step, in bytes. `threads`:
    PyTorch's intra-op threads (0: one per core); chunk: jaxemb's attention chunk."""
    ids = tokens(batch, seq)
    if framework == "jax":
        steps = jax_steps(path, ids, chunk)
    else:
        import torch
        import transformers
        torch.set_num_threads(threads or os.cpu_count())
        steps = torch_steps(transformers.EsmModel.from_pretrained(path, add_pooling_layer=False).eval(), ids)
    loaded = current_rss()
    steps[mode]()
    before = peak_rss()  # before step_peak resets it
    step = step_peak(steps[mode])
    return {"framework": framework, "mode": mode, "batch": batch, "seq": seq, "chunk": chunk, "loaded_bytes": loaded,
            "process_peak_bytes": max(before, step), "step_peak_bytes": step}


def measure_memory(shape: Shape, modes=("fwd", "fwd+bwd"), onednn: str = "default", threads: int = 0,
                   chunks=(0,)) -> list:
    """memory_child rows for torch and for jax at each attention chunk, at `shape` (batch x seq), each in
    its own `python -m` process."""
    path = tempfile.mkdtemp(prefix="jaxemb-esm2-mem-")
    rows = []
    try:
        torch_model(shape).save_pretrained(path)
        for mode in modes:
            for fw, chunk in [("jax", c) for c in chunks] + [("torch", 0)]:
                cmd = [sys.executable, "-m", "benchmarks.esm2_speed", "--onednn", onednn, "--memory-child",
                       fw, mode, path, str(shape.batch), str(shape.seq), str(threads), str(chunk)]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if res.returncode:
                    raise RuntimeError(f"memory run {fw} {mode} at {shape.batch}x{shape.seq} failed "
                                       f"(status {res.returncode}): {res.stderr.strip()[-2000:]}")
                rows.append(dict(json.loads(res.stdout.strip().splitlines()[-1]), shape=shape.name))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- report

def versions() -> dict:
    import jax
    import torch
    import transformers
    return {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def speed_table(rows: list) -> str:
    threads = list(dict.fromkeys(n for r in rows for n in r["torch_tok_s_by_threads"]))
    cores = os.cpu_count()
    head = ["shape", "params", "batch x L", "pass", "jaxemb tok/s",
            *(f"PyTorch tok/s ({n} thread{'s' * (n > 1)})" for n in threads),
            "jaxemb/PyTorch (faster PyTorch)", f"jaxemb/PyTorch ({cores} threads)", "max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tps = r["torch_tok_s_by_threads"]
        torch_cols = [f"{tps[n]:,.0f}" if n in tps else "-" for n in threads]
        cells = [f"{r['shape']} ({r['layers']}L, d {r['d']}, {r['heads']} heads, mlp {r['mlp']})",
                 f"{r['params'] / 1e6:.1f}M", f"{r['batch']}x{r['seq']}", r["mode"], f"{r['jax_tok_s']:,.0f}",
                 *torch_cols, f"{r['ratio']:.2f}x",
                 f"{r['ratio_cores']:.2f}x" if r["ratio_cores"] else "-", f"{r['max_abs_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f}"
    torch_row = {r["mode"]: r for r in rows if r["framework"] == "torch"}
    lines = ["| shape | batch x L | pass | jaxemb attention chunk | jaxemb step peak above loaded GiB "
             "| PyTorch step peak above loaded GiB | jaxemb / PyTorch step peak GiB "
             "| jaxemb / PyTorch process peak GiB | jaxemb / PyTorch loaded GiB |", "|" + "---|" * 9]
    for j in (r for r in rows if r["framework"] == "jax"):
        t = torch_row[j["mode"]]
        pair = lambda key: f"{gib(j[key])} / {gib(t[key])}"  # noqa: E731
        lines.append(f"| {j['shape']} | {j['batch']}x{j['seq']} | {j['mode']} | {j.get('chunk', 0) or 'whole L'} | "
                     f"{gib(j['step_peak_bytes'] - j['loaded_bytes'])} | "
                     f"{gib(t['step_peak_bytes'] - t['loaded_bytes'])} | {pair('step_peak_bytes')} | "
                     f"{pair('process_peak_bytes')} | {pair('loaded_bytes')} |")
    return "\n".join(lines)


def report(rows: list, mem_rows: list, info: dict, args) -> str:
    h = info["host"]
    v = info["versions"]
    out = ["### ESM2 encoder: jaxemb vs Hugging Face EsmModel (PyTorch), CPU",
           "",
           f"{v['date']}; {h['cpu_model']}, {h['cpu_count']} cores (shared); JAX {v['jax']} (XLA:CPU, oneDNN "
           f"{args.onednn}), torch {v['torch']}, transformers "
           f"{v['transformers']} (attention: {info['attn']}); fp32. Command: "
           f"`{' '.join(['python -m benchmarks.esm2_speed', *info['argv']])}`.",
           "",
           "Same random weights (save_pretrained -> jaxemb `load_pretrained`), same tokens, no padding. fwd: "
           "`encode` vs EsmModel under no_grad; fwd+bwd: gradient of mean(last_hidden_state^2) w.r.t. all "
           "parameters. tokens/s = batch x L / median step time over interleaved repetitions (jax, torch, "
           "jax, torch, ...; one warm-up each, not timed). PyTorch runs at the intra-op thread counts "
           "of the columns (one per core, as XLA, and 1: on a shared, loaded machine OpenMP's busy-waiting "
           "threads can make more threads much slower); the first ratio is against the fastest one timed. "
           "jaxemb/PyTorch > 1 means jaxemb is faster. max abs diff: last hidden states of the two. Load "
           f"average (1 min) at start / end: {info['load'][0]:.1f} / {info['load'][1]:.1f}.",
           "", speed_table(rows)]
    if mem_rows:
        out += ["", "Peak resident memory, each framework and pass in its own process (L includes <cls>/<eos>). "
                    "step peak: during one step after a warm-up step (VmHWM reset via /proc/self/clear_refs), "
                    "weights and interpreter included; process peak: VmHWM over loading, warm-up (JAX: "
                    "compilation) and the step; loaded: RSS with the model and inputs in memory, before any step "
                    "(the PyTorch process imports torch and transformers, the JAX one jax and flax).",
                "", memory_table(mem_rows)]
    return "\n".join(out) + "\n"


def int_list(text: str, flag: str, what: str = "thread counts", minimum: int = 1) -> tuple:
    """The comma-separated integers of a flag's value, each at least `minimum`."""
    try:
        out = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise ValueError(f"{flag}={text!r}; expected comma-separated {what}") from None
    if not out or min(out) < minimum:
        raise ValueError(f"{flag}={text!r}; expected one or more {what}, each at least {minimum}")
    return out


def shapes_from(args) -> list:
    out = []
    for name in args.shapes.split(","):
        if name not in ARCH:
            raise ValueError(f"unknown shape {name!r}; expected some of {','.join(ARCH)}")
        big = name != "t6_8M"
        out.append((Shape(name, **ARCH[name], batch=args.big_batch if big else args.batch,
                          seq=args.big_seq if big else args.seq), args.big_reps if big else args.reps))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="t6_8M,t33_650M", help=f"comma-separated, of {','.join(ARCH)}")
    p.add_argument("--batch", type=int, default=8, help="t6_8M batch")
    p.add_argument("--seq", type=int, default=256, help="t6_8M tokens per row")
    p.add_argument("--reps", type=int, default=12, help="t6_8M timed repetitions per framework and pass")
    p.add_argument("--big-batch", type=int, default=1, help="t33_650M batch")
    p.add_argument("--big-seq", type=int, default=256)
    p.add_argument("--big-reps", type=int, default=3)
    p.add_argument("--mem-batch", type=int, default=1, help="batch of the t6_8M peak-memory runs")
    p.add_argument("--mem-seq", type=int, default=2000, help="tokens per row of the peak-memory runs")
    p.add_argument("--mem-modes", default="fwd,fwd+bwd")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--mem-attention-chunks", default="0,256",
                   help="jaxemb attention chunks of the memory runs, comma-separated (0: whole length)")
    p.add_argument("--torch-threads", default=f"{os.cpu_count()},1",
                   help="PyTorch intra-op thread counts timed, comma-separated (default: one per core, and 1)")
    p.add_argument("--big-torch-threads", default=str(os.cpu_count()),
                   help="the same for t33_650M (default: one per core)")
    p.add_argument("--mem-torch-threads", type=int, default=0, help="PyTorch threads of the memory runs "
                   "(0: one per core)")
    p.add_argument("--quick", action="store_true",
                   help="t6_8M only, 2x128, 3 reps; memory at L=512 (overrides the size flags)")
    p.add_argument("--workdir", default="runs/bench_esm2", help="results.json goes here")
    p.add_argument("--note", default="", help="also write the markdown section to this file")
    p.add_argument("--onednn", choices=ONEDNN_MODES[:3], default="default",
                   help="XLA:CPU oneDNN switch (--xla_cpu_use_onednn)")
    p.add_argument("--memory-child", nargs=7,
                   metavar=("FRAMEWORK", "MODE", "CKPT", "BATCH", "SEQ", "THREADS", "CHUNK"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_onednn(args.onednn)
    if args.memory_child:
        fw, mode, path, batch, seq, threads, chunk = args.memory_child
        print(json.dumps(memory_child(fw, mode, path, int(batch), int(seq), int(threads), int(chunk))), flush=True)
        return
    if args.quick:
        args.shapes, args.batch, args.seq, args.reps, args.mem_seq = "t6_8M", 2, 128, 3, 512
    modes = tuple(args.mem_modes.split(","))
    if not set(modes) <= {"fwd", "fwd+bwd"}:
        raise ValueError(f"--mem-modes={args.mem_modes!r}; expected fwd, fwd+bwd or both, comma-separated")
    chunks = int_list(args.mem_attention_chunks, "--mem-attention-chunks", "attention chunks", minimum=0)
    shapes = shapes_from(args)
    threads = {"t6_8M": int_list(args.torch_threads, "--torch-threads"),
               "t33_650M": int_list(args.big_torch_threads, "--big-torch-threads")}
    load_start = os.getloadavg()[0]
    rows = []
    attn = "?"
    for shape, reps in shapes:
        print(f"{shape}: {reps} reps", flush=True)
        pair = Pair(shape, torch_threads=threads[shape.name])
        attn = pair.model.config._attn_implementation
        new = measure(pair, reps)
        del pair
        for r in new:
            print(json.dumps(r), flush=True)
        rows += new
    mem_rows = []
    if not args.no_memory:
        mem = Shape("t6_8M", **ARCH["t6_8M"], batch=args.mem_batch, seq=args.mem_seq)
        mem_rows = measure_memory(mem, modes, args.onednn, args.mem_torch_threads, chunks)
    info = {"host": host(), "versions": versions(), "attn": attn, "load": (load_start, os.getloadavg()[0]),
            "argv": list(sys.argv[1:] if argv is None else argv)}
    text = report(rows, mem_rows, info, args)
    print("\n" + text)
    os.makedirs(args.workdir, exist_ok=True)
    from experiments.harness import write_json
    write_json(os.path.join(args.workdir, "results.json"), {"rows": rows, "memory": mem_rows, **info})
    if args.note:
        with open(args.note, "w") as f:
            f.write(text)


if __name__ == "__main__":
    if "--memory-child" in sys.argv:
        main()  # imports one framework only (run_cli would import jax); LD_PRELOAD comes from the parent
    else:
        from experiments.harness import run_cli
        run_cli(main)  # tcmalloc re-run and one-line errors, as the other benchmarks

"""Memory and speed of the lexinvariant readout: materialised (B, V, d) table vs blockwise_nll.

    python -m benchmarks.readout_memory                        # V 32,768, d 256, L 128, B 1/4/8, blocks 1024/4096
    python -m benchmarks.readout_memory --batch 1 2 --blocks 512 --vocab 4096   # smaller
    python -m benchmarks.readout_memory --append               # also append the table to BENCHMARKS.md

Both sides compute the mean next-token NLL and its gradient w.r.t. h (B, L, d) in one jit-compiled
value_and_grad, from the same rng key (the random table is generated inside the function in both cases).
Memory is XLA's compile-time analysis (memory_analysis() of the compiled function): "temp" is
temp_size_in_bytes, "peak" is argument + output + temp - alias bytes. Time is the median wall time of
--repeats calls after one warm-up call. The loss and gradient differences are between the two float32
results of the same run.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import machine, run_cli, save_figure, write_json
from jaxemb.nn.embeddings import token_nll
from jaxemb.nn.lexinvariant_vectors import blockwise_nll, sequence_keys, sequence_tables

MIB = 2 ** 20
HEADING = "## Lexinvariant readout: materialised vs blockwise (`python -m benchmarks.readout_memory`)"


def materialised_loss(h, key, targets, vocab, scale):
    table = sequence_tables(key, h.shape[0], vocab, h.shape[-1])  # (B, V, d)
    return token_nll(jnp.einsum("bld,bvd->blv", h, table) * scale, targets).mean()


def blockwise_loss(h, key, targets, vocab, block, scale):
    return blockwise_nll(h, sequence_keys(key, h.shape[0]), targets, vocab, block, scale).mean()


def compile_stats(loss, args) -> tuple:
    """(compiled value_and_grad wrt h, dict of XLA memory numbers in bytes)."""
    compiled = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
    m = compiled.memory_analysis()
    mem = {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
           "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
           "xla_peak_bytes": getattr(m, "peak_memory_in_bytes", None)}
    mem["peak_bytes"] = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"] - mem["alias_bytes"]
    return compiled, mem


def timed(compiled, args, repeats: int) -> tuple:
    """(loss, grad) of one warm-up call and the median seconds of `repeats` more."""
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def measure_batch(b: int, args) -> list:
    """Rows for one batch size: materialised first, then one per block size."""
    rng = np.random.default_rng(args.seed + b)
    h = jnp.asarray(rng.normal(size=(b, args.seq, args.dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, args.vocab, size=(b, args.seq)), jnp.int32)
    inputs = (h, jax.random.key(args.seed + b), targets)
    scale = args.dim ** -0.5
    sizes = {"batch": b, "table_bytes": 4 * b * args.vocab * args.dim, "logits_bytes": 4 * b * args.seq * args.vocab}
    losses = [("materialised", None, functools.partial(materialised_loss, vocab=args.vocab, scale=scale))]
    losses += [("blockwise", k, functools.partial(blockwise_loss, vocab=args.vocab, block=k, scale=scale))
               for k in args.blocks]
    rows, ref = [], None
    for name, block, loss in losses:
        compiled, mem = compile_stats(loss, inputs)
        row = {"readout": name, "block": block, **sizes, **mem, "call_s": None,
               "loss": None, "loss_abs_diff": None, "grad_max_abs_diff": None, "grad_max_abs": None}
        if mem["peak_bytes"] <= args.max_gib * 2 ** 30:  # too big to run here: report memory only
            (value, grad), row["call_s"] = timed(compiled, inputs, args.repeats)
            row["loss"], row["grad_max_abs"] = float(value), float(jnp.abs(grad).max())
            if ref is None and name == "materialised":
                ref = (value, grad)
            elif ref is not None:
                row["loss_abs_diff"] = float(jnp.abs(value - ref[0]))
                row["grad_max_abs_diff"] = float(jnp.abs(grad - ref[1]).max())
        rows.append(row)
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    a, m = result["args"], result["machine"]
    lines = [f"{m['date']}, {m['backend']} {m['device']}, {m['cpu_count']} CPUs, {m['num_devices']} device(s), "
             f"jax {m['jax']}. Vocabulary {a['vocab']:,}, d {a['dim']}, L {a['seq']}, float32; mean NLL and "
             f"its gradient w.r.t. h in one jit. XLA temp = temp_size_in_bytes; peak = argument + output + "
             f"temp - alias (compiled memory_analysis). ms = median of {a['repeats']} calls after warm-up. "
             "Differences are against the materialised loss/gradient of the same run.",
             "", "| B | readout | block | (B,V,d) table MiB | (B,L,V) logits MiB | XLA temp MiB | peak MiB "
             "| ms/call | abs loss diff | max abs grad diff (max abs grad) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        grad = "-" if r["grad_max_abs_diff"] is None else f"{r['grad_max_abs_diff']:.1e} ({r['grad_max_abs']:.1e})"
        lines.append(f"| {r['batch']} | {r['readout']} | {r['block'] or '-'} | {r['table_bytes'] / MIB:,.0f} "
                     f"| {r['logits_bytes'] / MIB:,.0f} | {r['temp_bytes'] / MIB:,.1f} | {r['peak_bytes'] / MIB:,.1f} "
                     f"| {_fmt(r['call_s'] and 1e3 * r['call_s'], ',.0f')} | {_fmt(r['loss_abs_diff'], '.1e')} "
                     f"| {grad} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = result["rows"]
    for name, block in dict.fromkeys((r["readout"], r["block"]) for r in rows):
        sel = [r for r in rows if (r["readout"], r["block"]) == (name, block)]
        ax.plot([r["batch"] for r in sel], [r["peak_bytes"] / MIB for r in sel], "o-",
                label=name if block is None else f"{name}, block {block}")
    first = [r for r in rows if r["readout"] == "materialised"]
    ax.plot([r["batch"] for r in first], [r["table_bytes"] / MIB for r in first], "k:", label="(B,V,d) table size")
    ax.set(yscale="log", xlabel="batch B", ylabel="compiled peak MiB (fwd+bwd)",
           title=f"V={result['args']['vocab']:,}, d={result['args']['dim']}, L={result['args']['seq']}")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--blocks", type=int, nargs="+", default=[1024, 4096], help="blockwise vocabulary block sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per setting (after one warm-up)")
    p.add_argument("--max-gib", type=float, default=4.0, help="compile but do not run settings whose peak exceeds this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_readout/results.json", help="results JSON (plot written beside it)")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.vocab < 2:
        p.error(f"--vocab must be >= 2, got {args.vocab}")
    for name in ("dim", "seq", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.batch) < 1:
        p.error(f"--batch sizes must be >= 1, got {args.batch}")
    if min(args.blocks) <= 0:
        p.error(f"--blocks must be > 0, got {args.blocks}")
    if args.max_gib <= 0:
        p.error(f"--max-gib must be > 0, got {args.max_gib}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    rows = [r for b in sorted(set(args.batch)) for r in measure_batch(b, args)]
    result = {"args": vars(args), "machine": machine(), "rows": rows}
    text = table(result)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, result)
    plot(result, os.path.join(os.path.dirname(args.out), "peak_memory.png"))
    if args.append:
        with open("BENCHMARKS.md", "a") as f:
            f.write(f"\n{HEADING}\n\n{text}\n")
    return result


if __name__ == "__main__":
    run_cli(main)  # tcmalloc re-run and one-line errors, as the experiments

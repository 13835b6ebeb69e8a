"""Interleaved A/B of LM train-step time between config variants, in one process.

    python -m benchmarks.step_ab model.query_blocks=1 model.query_blocks=2
    python -m benchmarks.step_ab "" model.position=none --steps 40     # "" = the config unchanged
    python -m benchmarks.step_ab model.query_blocks=4 model.query_blocks=8 --size 150M --batch 2

Each argument is one variant: comma-separated `key=value` overrides of a train_throughput size (default,
150M, tiny). Every variant is compiled and warmed up first. Then their steps alternate (A, B, A, B, ...), so
slow phases of a shared or throttled machine fall on all variants alike. That is how the per-change
numbers in BENCHMARKS.md were measured. Prints median and quartiles of ms per step, and writes
results.json and step_ab.png to --workdir.
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from benchmarks.train_throughput import configs, interleaved_times, jax_runner
from experiments.harness import machine, run_cli, save_figure, write_json
from jaxemb.config import apply_overrides


def variant_step(size: str, overrides: str, batch: int):
    """One warmed-up train step closure for the size with `overrides` ("a=1,b=2"; "" for none)."""
    cfg = configs([size], batch or 4)[size]
    if batch:
        cfg.train.batch_size = batch
    apply_overrides(cfg, [o for o in overrides.split(",") if o.strip()])
    return jax_runner(cfg)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='comma-separated key=value overrides per variant ("" = none)')
    p.add_argument("--size", default="default", help="default, 150M or tiny (as benchmarks.train_throughput)")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: the size's)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--workdir", default="runs/step_ab")
    args = p.parse_args(argv)
    if len(set(args.variants)) != len(args.variants):
        raise ValueError(f"variants must differ; got {args.variants}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    os.makedirs(args.workdir, exist_ok=True)
    names = [v or "(config)" for v in args.variants]
    steps = {n: variant_step(args.size, v, args.batch) for n, v in zip(names, args.variants)}
    times = interleaved_times(steps, args.steps, args.steps)  # rounds of one step each
    rows = [{"variant": n, "median_ms": 1e3 * float(np.median(t)), "p25_ms": 1e3 * float(np.percentile(t, 25)),
             "p75_ms": 1e3 * float(np.percentile(t, 75)), "steps_ms": [1e3 * x for x in t]}
            for n, t in times.items()]
    width = max(len(n) for n in names)
    print(f"\n{'variant':{width}s}  median ms   p25 ms   p75 ms")
    for r in rows:
        print(f"{r['variant']:{width}s}  {r['median_ms']:9.1f}  {r['p25_ms']:7.1f}  {r['p75_ms']:7.1f}")
    write_json(os.path.join(args.workdir, "results.json"),
               {"size": args.size, "batch": args.batch, "rows": rows, "machine": machine()})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows) + 2), 3.5))
    ax.boxplot([r["steps_ms"] for r in rows])
    ax.set_xticks(range(1, len(rows) + 1), [r["variant"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("ms per train step")
    ax.set_title(f"interleaved A/B, {args.size} config, {jax.default_backend()}")
    save_figure(fig, os.path.join(args.workdir, "step_ab.png"))
    print(f"\nresults: {args.workdir}  (results.json, step_ab.png)")


if __name__ == "__main__":
    run_cli(main)  # tcmalloc re-run and one-line errors, as the experiments

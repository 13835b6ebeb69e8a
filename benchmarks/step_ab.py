"""Interleaved A/B of LM train-step time between config variants, in one process.

    python -m benchmarks.step_ab model.query_blocks=1 model.query_blocks=2
    python -m benchmarks.step_ab "" model.position=none --steps 40     # "" = the config unchanged
    python -m benchmarks.step_ab model.query_blocks=4 model.query_blocks=8 --config paper --batch 2

Each argument is one variant: comma-separated `key=value` overrides of the lexinvariant config (kind
standard). Every variant is compiled and warmed up first. Then their steps alternate (A, B, A, B, ...), so
slow phases of a shared or throttled machine fall on all variants alike. That is how the per-change
numbers in BENCHMARKS.md were measured. Prints median and quartiles of ms per step, and writes
results.json and step_ab.png to --workdir.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from benchmarks.train_throughput import RandomTokens
from experiments.common import machine, run_cli, write_json
from experiments.configs.lexinvariant import get_config
from jaxemb.config import apply_overrides
from jaxemb.models.lexinvariant import LanguageModelTask
from jaxemb.train import Trainer


def variant_step(config: str, overrides: str, batch: int, workdir: str, warmup: int = 2):
    """One warmed-up train step closure for the config with `overrides` ("a=1,b=2"; "" for none)."""
    cfg = get_config(config)
    cfg.model.kind = "standard"
    if config == "paper":
        cfg.mesh.shape = dict(data=-1, fsdp=1, tensor=1)
        if jax.default_backend() == "cpu":
            cfg.train.compute_dtype = "float32"
    if batch:
        cfg.train.batch_size = batch
    apply_overrides(cfg, [o for o in overrides.split(",") if o.strip()])
    cfg.train.update(steps=10 ** 9, checkpoint_every=0, eval_every=0, progress=False)
    trainer = Trainer(LanguageModelTask(cfg.model, cfg.data.seq_len), cfg, os.path.join(workdir, "unused"))
    src = RandomTokens(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    batches = [trainer.put_batch(src, i) for i in range(4)]
    box = {"state": trainer.init_state(batches[0]), "i": 0}

    def step():
        box["state"], metrics = trainer.train_step(box["state"], batches[box["i"] % 4])
        box["i"] += 1
        jax.block_until_ready(metrics)

    for _ in range(warmup):
        step()
    return step


def interleave(steps: dict, count: int) -> dict:
    """Seconds of each of `count` alternating single steps per variant."""
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='comma-separated key=value overrides per variant ("" = none)')
    p.add_argument("--config", default="default", help="lexinvariant config name (default, tiny, paper)")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: the config's)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--workdir", default="runs/step_ab")
    args = p.parse_args(argv)
    if len(set(args.variants)) != len(args.variants):
        raise ValueError(f"variants must differ; got {args.variants}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    os.makedirs(args.workdir, exist_ok=True)
    names = [v or "(config)" for v in args.variants]
    steps = {n: variant_step(args.config, v, args.batch, args.workdir) for n, v in zip(names, args.variants)}
    times = interleave(steps, args.steps)
    rows = [{"variant": n, "median_ms": 1e3 * float(np.median(t)), "p25_ms": 1e3 * float(np.percentile(t, 25)),
             "p75_ms": 1e3 * float(np.percentile(t, 75)), "steps_ms": [1e3 * x for x in t]}
            for n, t in times.items()]
    width = max(len(n) for n in names)
    print(f"\n{'variant':{width}s}  median ms   p25 ms   p75 ms")
    for r in rows:
        print(f"{r['variant']:{width}s}  {r['median_ms']:9.1f}  {r['p25_ms']:7.1f}  {r['p75_ms']:7.1f}")
    write_json(os.path.join(args.workdir, "results.json"),
               {"config": args.config, "batch": args.batch, "rows": rows, "machine": machine()})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows) + 2), 3.5))
    ax.boxplot([r["steps_ms"] for r in rows])
    ax.set_xticks(range(1, len(rows) + 1), [r["variant"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("ms per train step")
    ax.set_title(f"interleaved A/B, {args.config} config, {jax.default_backend()}")
    fig.tight_layout()
    tmp = os.path.join(args.workdir, "step_ab.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, os.path.join(args.workdir, "step_ab.png"))
    print(f"\nresults: {args.workdir}  (results.json, step_ab.png)")


if __name__ == "__main__":
    run_cli(main)  # tcmalloc re-run and one-line errors, as the experiments

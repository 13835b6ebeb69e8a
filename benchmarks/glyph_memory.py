"""Memory and speed of a frozen glyph embedding table vs a trainable one (vocabulary 65,536, d 1024).

    python -m benchmarks.glyph_memory                      # 2 layers, batch 2 x 64 tokens (CPU-sized)
    python -m benchmarks.glyph_memory --layers 16 --batch 8 --seq 1024 --dtype bfloat16   # GPU/TPU
    python -m benchmarks.glyph_memory --append             # also append the table to BENCHMARKS.md

Both models are the shared Transformer with an untied head; they differ only in whether the 65,536 x 1024
input table is trained. Reports parameter and optimizer-state bytes (exact, from the train state) and the
median train-step time (after one compile step) through the training core's jit-compiled step.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from experiments.harness import machine, run_cli
from experiments.configs.glyph import get_config
from jaxemb.data import glyphs
from jaxemb.data.unicode_tokenizer import UnicodeTokenizer
from jaxemb.models.glyph import GlyphLMTask
from jaxemb.train import Trainer

VOCAB, DIM = 65536, 1024


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def measure(kind: str, table, args) -> dict:
    cfg = get_config("paper")
    cfg.model.update(kind=kind, vocab_size=VOCAB, num_layers=args.layers, remat=False)
    cfg.mesh.shape = dict(data=-1, fsdp=1, tensor=1)
    cfg.train.update(batch_size=args.batch, steps=args.steps + 1, compute_dtype=args.dtype, progress=False)
    task = GlyphLMTask(cfg.model, args.seq, table)
    trainer = Trainer(task, cfg, "/tmp/jaxemb_glyph_memory")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones_like(tokens[:, :-1]),
             "weights": np.ones(tokens[:, 1:].shape, np.float32)}
    batch = jax.device_put(batch, trainer.batch_shardings(batch))
    state = trainer.init_state(batch)
    params, opt = nbytes(state["params"]), nbytes(state["opt_state"])
    trainable = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
                    if not (task.frozen(tuple(str(getattr(k, "key", k)) for k in p))))
    t = time.perf_counter()
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step = float(np.median(times))
    return {"kind": kind, "param_bytes": params, "opt_state_bytes": opt, "trainable_params": int(trainable),
            "step_s": step, "tokens_per_s": args.batch * args.seq / step, "first_step_s": compile_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    t = time.perf_counter()
    table = glyphs.build_glyph_matrix(UnicodeTokenizer(), dim=DIM)  # all 65,536 ids; cached after the first run
    build_s = time.perf_counter() - t
    rows = [measure(k, table, args) for k in ("glyph", "trainable")]
    gib = 2 ** 30
    lines = [f"glyph embeddings, vocab {VOCAB:,} x d {DIM}, {args.layers} layers, batch {args.batch} x {args.seq}, "
             f"{args.dtype}, Adam; {machine()['backend']} ({machine()['device']}, {jax.device_count()} device(s)), "
             f"jax {jax.__version__}, {machine()['date']}; glyph matrix built/loaded in {build_s:.1f}s",
             "", "| embedding | trainable params | param GiB | optimizer state GiB | step s (median) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['trainable_params']:,} | {r['param_bytes'] / gib:.3f} | "
                     f"{r['opt_state_bytes'] / gib:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} |")
    saved = rows[1]["opt_state_bytes"] - rows[0]["opt_state_bytes"]
    lines.append(f"\nfrozen table saves {saved / gib:.3f} GiB of optimizer state "
                 f"({saved / rows[1]['opt_state_bytes']:.0%}); step time ratio glyph/trainable "
                 f"{rows[0]['step_s'] / rows[1]['step_s']:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open("BENCHMARKS.md", "a") as f:
            f.write("\n" + text + "\n")
    return rows


if __name__ == "__main__":
    run_cli(main)  # tcmalloc re-run and one-line errors, as the experiments

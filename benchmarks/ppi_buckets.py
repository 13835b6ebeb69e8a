"""Length-bucketed batches for the PPI fine-tuning heads: tokens the encoder sees per epoch and the time of
one epoch of fwd+bwd steps, full-width batches against bucketed ones (jaxemb.data.sources.BucketSource).

    python -m benchmarks.ppi_buckets                 # the default and paper layouts on skempi_multichain.csv
    python -m benchmarks.ppi_buckets --time-kinds sc,hp --out runs/ppi_buckets.json

Token counts are exact (no model). Timing: the default study's small ESM2 (random weights) and head, one
jitted value_and_grad step per batch over the training rows, after a warm-up pass that compiles each width.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import cpu_model

LAYOUTS = {"default": dict(max_chain=66, max_side=160, max_joint=256),
           "paper": dict(max_chain=2000, max_side=2000, max_joint=2000)}


def sources(arrays, kind, batch, quantum):
    from jaxemb.data.sources import ArraySource, BucketSource
    from jaxemb.models import ppi
    cut, lengths = ppi.bucket_spec(arrays, kind, "finetune")
    full = ArraySource(arrays, batch, shuffle=True, drop_last=True)
    return full, BucketSource(arrays, lengths, batch, cut, shuffle=True, drop_last=True, quantum=quantum), cut


def tokens(src, cut):
    """Tokens (rows x width of the first cut array, both sides for EC/PAD) in one pass, and the widths."""
    total, widths = 0, set()
    for i in range(src.num_batches):
        b = src.get(i)
        total += sum(b[k].size for k in cut if k != "packed_seg")
        widths.add(b[cut[0]].shape[1])
    return total, sorted(widths)


def epoch_seconds(kind, arrays, src, steps):
    import jax
    import flax.linen as nn
    from experiments.configs.ppi import get_config
    from jaxemb.data import proteins
    from jaxemb.models import ppi
    from jaxemb.models.esm2 import Esm2Config
    from jaxemb.models.plm import esm2_backbone
    e = get_config("default").encoder
    enc = Esm2Config(vocab_size=len(proteins.ALPHABET), d_model=e.d_model, num_layers=e.num_layers,
                     num_heads=e.num_heads, mlp_dim=e.mlp_dim, token_dropout=False)
    task = ppi.PPITask(ppi.HeadConfig(kind=kind, max_chains=int((arrays["n_lig"] + arrays["n_rec"]).max())
                                      if kind == "hp" else 16), esm2_backbone(enc), "finetune")
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0), src.get(0)))
    step = jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, None)[0]))
    n = min(steps, src.num_batches)
    for i in range(n):  # warm-up: one compilation per width
        jax.block_until_ready(step(params, src.get(i)))
    t = time.perf_counter()
    for i in range(n):
        jax.block_until_ready(step(params, src.get(i)))
    return (time.perf_counter() - t) / n * src.num_batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a PPB-Affinity CSV (default: ../shared skempi_multichain.csv)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--quantum", type=int, default=16)
    p.add_argument("--time-kinds", default="sc,hp", help="kinds to time on the default layout ('' for none)")
    p.add_argument("--time-steps", type=int, default=40, help="batches timed per source (scaled to an epoch)")
    p.add_argument("--out", default="runs/ppi_buckets.json")
    a = p.parse_args(argv)
    from experiments.configs.ppi import get_config
    from jaxemb.data import ppi as data
    from jaxemb.models import ppi
    d = data.read_affinity_csv(a.data or get_config("default").data.source)
    rows, table = [], []
    for name, layout in LAYOUTS.items():
        lay = data.layouts(d.complexes, data.Layout(**layout))
        for kind in ("pad", "sc", "hp"):
            arrays, _ = ppi.batch_arrays(lay, kind, "finetune")
            arrays["y"] = d.y.astype(np.float32)
            full, bucketed, cut = sources(arrays, kind, a.batch, a.quantum if name == "default" else 64)
            (t_full, _), (t_b, widths) = tokens(full, cut), tokens(bucketed, cut)
            row = {"layout": name, "kind": kind, "full_width": int(arrays[cut[0]].shape[1]), "tokens_full": t_full,
                   "tokens_bucketed": t_b, "token_ratio": round(t_full / t_b, 2), "widths": len(widths)}
            if name == "default" and kind in a.time_kinds.split(","):
                s_full = epoch_seconds(kind, arrays, full, a.time_steps)
                s_b = epoch_seconds(kind, arrays, bucketed, a.time_steps)
                row.update(epoch_s_full=round(s_full, 1), epoch_s_bucketed=round(s_b, 1), speedup=round(s_full / s_b, 2))
            rows.append(row)
            table.append(row)
            print(row, flush=True)
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "batch": a.batch, "complexes": len(d), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{out['cpu']}, {out['cores']} cores; batch {a.batch}; {len(d)} complexes")
    print(f"{'layout':8} {'kind':4} {'width':>5} {'tokens full':>12} {'bucketed':>10} {'ratio':>6} {'widths':>6} "
          f"{'epoch s full':>12} {'bucketed':>9}")
    for r in rows:
        print(f"{r['layout']:8} {r['kind']:4} {r['full_width']:5d} {r['tokens_full']:12d} {r['tokens_bucketed']:10d} "
              f"{r['token_ratio']:6.2f} {r['widths']:6d} {r.get('epoch_s_full', ''):>12} {r.get('epoch_s_bucketed', ''):>9}")
    return out


if __name__ == "__main__":
    main()

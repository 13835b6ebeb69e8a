"""Multi-chain binding affinity: the EC, SC, HP and PAD heads on a frozen (ConvBERT) or fine-tuned ESM2.

    python -m experiments.ppi                                  # default: this CPU, skempi_multichain.csv
    python -m experiments.ppi --checkpoint facebook/esm2_t6_8M_UR50D     # a real PLM (local dir or hub name)
    python -m experiments.ppi --checkpoint Rostlab/prot_t5_xl_uniref50   # ProtT5 / Ankh: their own tokenizer
    python -m experiments.ppi --data my.csv data.split=        # any PPB-Affinity-format CSV, split computed here
    python -m experiments.ppi --data proteinea/ppb_affinity    # the paper's data and split (needs `datasets`)
    python -m experiments.ppi study.variants=convbert:hp,finetune:pad train.steps=600

Steps: read the CSV (jaxemb.data.ppi), split by the PDB folds (or mutant/PDB groups), lay out the tokens;
without --checkpoint pretrain a small ESM2 by masked LM on the TRAINING split's chains (resumable in
WORKDIR/encoder_mlm, saved to WORKDIR/encoder); then per variant `mode:head` train the head through the core
(frozen: the embeddings computed once and cached in WORKDIR/features; finetune: the encoder trained with the
head), keep the step with the best validation Spearman, and score the test split. Prints the table beside the
paper's numbers and a no-PLM baseline (amino-acid composition + ridge); writes results.json, bars.png and
scatter.png into WORKDIR.
"""
from __future__ import annotations

import hashlib
import os
import sys

import jax
import numpy as np

from experiments import harness
from experiments.configs.ppi import get_config
from jaxemb import metrics
from jaxemb.data import ppi as data
from jaxemb.data.sources import ArraySource, BucketSource
from jaxemb.models import mlm
from jaxemb.models import plm, ppi
from jaxemb.models.esm2 import Esm2Config
from jaxemb.train import save_tree
from jaxemb.train.constants import unbox

# ppiseq README, Table 1 (test Spearman, mean of 3 seeds, PPB-Affinity, its own split): the best ESM2 entry of
# each setup in its top-10 list, else the best entry of any PLM, else "< 0.44" (below the top 10).
PAPER = {("convbert", "hp"): "0.47 ESM2-650M", ("finetune", "hp"): "0.44 ESM2-650M",
         ("finetune", "pad"): "0.44 ESM2-3B", ("convbert", "pad"): "0.48 ProtT5"}
OPTIONS = {"--checkpoint": ("encoder.checkpoint", "HF ESM2 / ProtT5 / Ankh checkpoint directory or hub name "
                                                   "(default: pretrain a small ESM2 here)")}


def load(cfg):
    """(dataset, split indices, derived counts)."""
    hub_split = None
    if data.is_hub_name(cfg.data.source):  # e.g. proteinea/ppb_affinity: the dataset's own split
        d, hub_split = data.read_affinity_hub(cfg.data.source, target=cfg.data.target)
    else:
        d = data.read_affinity_csv(cfg.data.source, target=cfg.data.target)
    if cfg.data.limit:  # a few complexes of many PDB ids (tests, quick looks): round-robin over the ids
        rank, seen = [], {}
        for i, p in enumerate(d.pdbs):
            rank.append((seen.get(p, 0), i))
            seen[p] = seen.get(p, 0) + 1
        rows = sorted(i for _, i in sorted(rank)[:cfg.data.limit])
        d = data.Dataset([d.complexes[i] for i in rows], d.target, d.duplicates)
    how = "PDB / mutant groups"
    if hub_split is not None and not cfg.data.limit:
        split, how = hub_split, "the dataset's own"
    elif cfg.data.split and not cfg.data.limit:
        split = data.cv5_split(d, cfg.data.split, cfg.data.fold, cfg.data.val_fraction, cfg.seed)
        how = f"PDB fold {cfg.data.fold}"
    elif cfg.data.split:  # a few complexes: too few for the folds, whole groups
        split = data.grouped_split(data.groups(d), 0.25, 0.25, cfg.seed)
    else:
        split = data.grouped_split(data.groups(d), cfg.data.test_fraction, cfg.data.val_fraction, cfg.seed)
    for name, idx in split.items():
        if len(idx) < 4:
            raise ValueError(f"the {name} split has {len(idx)} complexes; need at least 4 (more data, or "
                             "other data.val_fraction / data.test_fraction)")
    derived = {"complexes": len(d), "duplicates_dropped": d.duplicates, "pdb_ids": len(set(d.pdbs)), "split": how,
               **{f"{k}_complexes": len(v) for k, v in split.items()}}
    return d, split, derived


def pretrain_encoder(cfg, d, split, workdir):
    """(Backbone, save_tree directory of its params): the checkpoint given (ESM2, ProtT5 or Ankh), or a small
    ESM2 trained here by MLM on the training split's chains."""
    path = os.path.join(workdir, "encoder")
    e = cfg.encoder
    if e.checkpoint:
        bb, params = plm.from_checkpoint(e.checkpoint, e.tokenizer_style, attention_chunk=e.attention_chunk)
        tag = hashlib.sha256(os.path.abspath(e.checkpoint).encode()).hexdigest()[:8]
        path = os.path.join(workdir, f"encoder-{tag}")
        if not os.path.exists(path):
            save_tree(path, params)
        return bb, path
    from jaxemb.data import proteins
    enc_cfg = Esm2Config(vocab_size=len(proteins.ALPHABET), d_model=e.d_model, num_layers=e.num_layers,
                         num_heads=e.num_heads, mlp_dim=e.mlp_dim, token_dropout=False,
                         mask_token_id=proteins.MASK, pad_token_id=proteins.PAD, attention_chunk=e.attention_chunk)
    if os.path.exists(path):
        return plm.esm2_backbone(enc_cfg), path
    records = [(d.complexes[i].pdb, s) for i in split["train"] for s in d.complexes[i].ligands + d.complexes[i].receptors]
    tr, va = mlm.split_chains(records, cfg.mlm.valid_fraction, cfg.seed)
    m = cfg.mlm
    rows = lambda chains: {k: v for k, v in mlm.pack_chains(chains, m.seq_len).items() if k in ("tokens", "segment_ids")}
    c = harness.with_settings(cfg, **{"train.steps": m.steps, "train.batch_size": m.batch_size, "optim.lr": m.lr,
                                      "optim.end_lr": m.lr / 10, "train.best_metric": "", "train.eval_every": m.steps,
                                      "train.checkpoint_every": m.steps, "train.eval_batches": 4})
    train = ArraySource(rows(tr), m.batch_size, seed=cfg.seed, shuffle=True, drop_last=True, what="packed rows")
    valid = ArraySource(rows(va), m.batch_size)
    v = harness.train_variant("encoder_mlm", mlm.MLMTask(enc_cfg, m.seq_len), c, workdir, train, valid,
                              desc="ESM2 masked-LM pretraining")
    save_tree(path, v.params)
    return plm.esm2_backbone(enc_cfg), path


def frozen_features(bb, enc_path, tables, workdir, dtype):
    """Per-residue embeddings of the token tables, computed once and cached in workdir/features (keyed by
    the encoder's weights, the tokens and the dtype)."""
    params = _encoder_params(bb, enc_path)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in jax.tree.leaves(params)))
    out = {}
    for name, toks in tables.items():
        h = digest.copy()
        h.update(np.ascontiguousarray(toks).tobytes() + dtype.encode())
        file = os.path.join(harness.ensure_dir(os.path.join(workdir, "features")), f"{name}-{h.hexdigest()[:16]}.npz")
        if not os.path.exists(file):
            feats = ppi.embed_tables(bb.model(), params, {name: toks}, bb.vocab.pad, dtype=np.dtype(dtype))
            tmp = file + ".tmp.npz"
            np.savez(tmp, **feats)
            os.replace(tmp, file)
        with np.load(file) as z:
            out.update({k: z[k] for k in z.files})
    return out


def _encoder_params(bb, path):
    """The encoder params saved at `path`, on the first device (host-side use: embed_tables)."""
    from jaxemb.train import load_tree
    like = unbox(jax.eval_shape(lambda: bb.model().init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return load_tree(path, like, mesh, None)


def run_variant(cfg, name, mode, kind, seed, bb, enc_path, lay, d, split, workdir):
    arrays, tables = ppi.batch_arrays(lay, kind, mode)
    y = d.y
    arrays["y"] = y.astype(np.float32)
    tr = split["train"]
    head = ppi.HeadConfig(kind=kind, convbert=mode == "frozen", concat_first=cfg.head.concat_first,
                          convbert_dropout=cfg.head.convbert_dropout, convbert_attn_dropout=cfg.head.convbert_attn_dropout,
                          cross_heads=cfg.head.cross_heads, max_chains=int(lay["chain_idx"].shape[1]),
                          implementation=cfg.head.implementation)
    features = frozen_features(bb, enc_path, tables, workdir, cfg.encoder.feature_dtype) if mode == "frozen" else None
    task = ppi.PPITask(head, bb, mode, features, enc_path if mode == "finetune" else None,
                       (float(y[tr].mean()), float(y[tr].std())),
                       lora_rank=cfg.finetune.lora_rank if mode == "finetune" else 0, lora_alpha=cfg.finetune.lora_alpha)
    b = cfg.train.batch_size
    spec = ppi.bucket_spec(arrays, kind, mode) if cfg.data.bucket_quantum else None

    def source(idx, **kw):
        rows = {k: v[idx] for k, v in arrays.items()}
        if spec is None:
            return ArraySource(rows, b, **kw)
        return BucketSource(rows, spec[1][idx], b, spec[0], quantum=cfg.data.bucket_quantum, **kw)
    train = source(tr, seed=seed, shuffle=True, drop_last=True, what="training complexes")
    valid, test = source(split["val"]), source(split["test"])
    settings = {"train.eval_batches": valid.num_batches}  # the whole validation split
    if mode == "finetune":
        settings.update({"optim.lr": cfg.finetune.lr, "optim.end_lr": cfg.finetune.lr / 10})
        if cfg.finetune.steps:
            settings["train.steps"] = cfg.finetune.steps
    c = harness.with_settings(cfg, **settings)
    c.seed = seed

    def val_spearman(trainer, state):
        pred = harness.batch_rows(trainer, task.predict, state["params"], valid)
        return {"spearman": metrics.spearman(y[split["val"]], pred)}

    v = harness.train_variant(name, task, c, workdir, train, valid, eval_fn=val_spearman,
                              desc=f"{mode} {kind.upper()} (seed {seed})")
    best, meta = v.trainer.restore_best(v.result.state)
    out = {}
    for part, src in (("val", valid), ("test", test)):
        pred = harness.map_rows(v, task.predict, src, best["params"])
        out[part] = metrics.regression_report(y[split[part]], pred)
        out[part + "_pred"] = pred.tolist()
    out.update(best_step=int(meta["step"]), train_seconds=v.result.train_seconds,
               parameters=int(sum(np.size(x) for x in jax.tree.leaves(best["params"]["head"]))))
    return out


def main(argv=None) -> dict:
    args, cfg = harness.parse(sys.argv[1:] if argv is None else argv, __doc__.splitlines()[0], get_config,
                              "runs/ppi", options=OPTIONS)
    variants = [tuple(v.split(":")) for v in cfg.study.variants.split(",") if v]
    for v in variants:
        if len(v) != 2 or v[0] not in ("convbert", "finetune") or v[1] not in ppi.HEADS:
            raise ValueError(f"study.variants entry {':'.join(v)!r}; expected mode:head with mode convbert or "
                             f"finetune and head one of {ppi.HEADS}")
    d, split, derived = load(cfg)
    bb, enc_path = pretrain_encoder(cfg, d, split, args.workdir)
    lay = data.layouts(d.complexes, data.Layout(**cfg.layout), bb.vocab)
    derived.update(backbone=bb.kind, vocab=bb.vocab.name, cut=lay["cut"], unknown=lay["unknown"],
                   distinct_chains=len(lay["chain_tokens"]))
    runs = {}
    for mode, kind in variants:
        for seed in range(cfg.seed, cfg.seed + cfg.study.seeds):
            name = f"{mode}_{kind}_s{seed}"
            runs[name] = run_variant(cfg, name, "frozen" if mode == "convbert" else "finetune", kind, seed,
                                     bb, enc_path, lay, d, split, args.workdir)
            runs[name].update(mode=mode, head=kind, seed=seed)
    base = data.composition_baseline(d, split)
    table = []
    for mode, kind in variants:
        rs = [r for r in runs.values() if (r["mode"], r["head"]) == (mode, kind)]
        rho = [r["test"]["spearman"] for r in rs]
        table.append({"setup": f"{mode}-{kind.upper()}", "spearman": float(np.mean(rho)),
                      "+-": float(np.mean([r["test"]["spearman_err"] for r in rs])),
                      "pearson": float(np.mean([r["test"]["pearson"] for r in rs])),
                      "rmse": float(np.mean([r["test"]["rmse"] for r in rs])),
                      "val_rho": float(np.mean([r["val"]["spearman"] for r in rs])),
                      "paper_rho": PAPER.get((mode, kind), "< 0.44")})
    table.append({"setup": "composition", "spearman": base["spearman"], "+-": base["spearman_err"],
                  "pearson": base["pearson"], "rmse": base["rmse"], "val_rho": None, "paper_rho": "-"})
    harness.print_table(table, f"test split ({derived['test_complexes']} complexes, {cfg.study.seeds} seed(s)); "
                               "paper: PPB-Affinity with its own split and 650M+ PLMs, not the same test set",
                        width=11)
    plots(args.workdir, table, runs, d.y, split)
    results = {"table": table, "runs": runs, "composition_baseline": base, "encoder": enc_path,
               "target": cfg.data.target}
    results = harness.write_results(args.workdir, "results.json", results, cfg, derived)
    print(f"\nresults: {os.path.abspath(args.workdir)}  (results.json, bars.png, scatter.png)")
    return results


def plots(workdir, table, runs, y, split):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = table
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows)), 3.8))
    ax.bar(range(len(rows)), [r["spearman"] for r in rows], yerr=[r["+-"] for r in rows], capsize=3,
           color=["C0" if r["setup"].startswith("convbert") else "C1" if r["setup"].startswith("finetune") else "0.6"
                  for r in rows])
    ax.set_xticks(range(len(rows)), [r["setup"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="test Spearman", title="binding affinity, test split (error bar: the reference's SE)")
    ax.grid(alpha=0.3, axis="y")
    harness.save_figure(fig, os.path.join(workdir, "bars.png"))
    plt.close(fig)
    names = list(runs)
    cols = min(4, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(3.2 * cols, 3.0 * -(-len(names) // cols)),
                             squeeze=False)
    truth = y[split["test"]]
    for ax, name in zip(axes.flat, names):
        ax.scatter(truth, runs[name]["test_pred"], s=4, alpha=0.4)
        lo, hi = float(truth.min()), float(truth.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(title=f"{name}: rho {runs[name]['test']['spearman']:.2f}", xlabel="true", ylabel="predicted")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    harness.save_figure(fig, os.path.join(workdir, "scatter.png"))
    plt.close(fig)


if __name__ == "__main__":
    harness.run_cli(main)

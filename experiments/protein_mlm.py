"""Masked-LM pretraining of a small ESM2-architecture model on protein chains, against the unigram baseline.

    python -m experiments.protein_mlm                         # default: the affinity CSV's chains, CPU, minutes
    python -m experiments.protein_mlm --data chains.fasta     # FASTA (or a CSV with the same chain columns)
    python -m experiments.protein_mlm train.steps=1000 model.d_model=128   # any config key

Reads the chains (FASTA: grouped by the header id before '_', e.g. 1A22_A -> 1A22; CSV: by its PDB column),
dedupes them, holds out the chains of a hashed fraction of the groups, packs each side into rows with segment
ids, trains the encoder with BERT/ESM masking through the core (resumable in WORKDIR/esm2), then prints the
masked-residue perplexity and accuracy on the held-out chains beside the unigram baseline (training-chain
residue frequencies) and writes results.json and loss.png into WORKDIR.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np

from experiments import harness
from experiments.configs.protein_mlm import get_config
from jaxemb.data import proteins
from jaxemb.data.sources import ArraySource
from jaxemb.models import mlm
from jaxemb.models.esm2 import Esm2Config
from jaxemb.train.metrics import read_metrics


def read_records(source: str) -> list:
    """[(group, chain)] from a CSV (by extension) or FASTA file."""
    if not os.path.exists(source):
        raise FileNotFoundError(2, "No such file or directory (data.source: a FASTA or CSV file)", source)
    if source.lower().endswith(".csv"):
        return proteins.read_chains_csv(source)
    return [(name.split("_")[0], seq) for name, seq in proteins.read_fasta(source)]


def prepare(cfg):
    train_chains, valid_chains = mlm.split_chains(read_records(cfg.data.source), cfg.data.valid_fraction, cfg.seed)
    train, valid = (mlm.pack_chains(c, cfg.data.seq_len) for c in (train_chains, valid_chains))
    b = cfg.train.batch_size
    arrays = lambda p: {"tokens": p["tokens"], "segment_ids": p["segment_ids"]}
    derived = {"train_chains": len(train_chains), "valid_chains": len(valid_chains),
               "train_rows": len(train["tokens"]), "valid_rows": len(valid["tokens"]),
               "train_residues": int(mlm.maskable(train["tokens"]).sum()),
               "valid_residues": int(mlm.maskable(valid["tokens"]).sum()),
               "chains_cut": train["chains_cut"] + valid["chains_cut"], "unknown": train["unknown"] + valid["unknown"]}
    return (ArraySource(arrays(train), b, seed=cfg.seed, shuffle=True, drop_last=True, what="packed train rows"),
            ArraySource(arrays(valid), b), train["tokens"], valid["tokens"], derived)


def unigram_baseline(train_tokens, valid_tokens) -> dict:
    """Exact perplexity and accuracy of the training unigram on every held-out residue (the masked positions
    are a uniform sample of them)."""
    p = mlm.unigram(train_tokens)
    ids = valid_tokens[mlm.maskable(valid_tokens)]
    return {"ppl": float(np.exp(-np.log(p[ids]).mean())), "accuracy": float((ids == np.argmax(p)).mean())}


def main(argv=None) -> dict:
    args, cfg = harness.parse(sys.argv[1:] if argv is None else argv, __doc__.splitlines()[0], get_config,
                              "runs/protein_mlm")
    train, valid, train_tokens, valid_tokens, derived = prepare(cfg)
    m = cfg.model
    model_cfg = Esm2Config(vocab_size=len(proteins.ALPHABET), d_model=m.d_model, num_layers=m.num_layers,
                           num_heads=m.num_heads, mlp_dim=m.mlp_dim, token_dropout=m.token_dropout,
                           mask_token_id=proteins.MASK, pad_token_id=proteins.PAD)
    task = mlm.MLMTask(model_cfg, cfg.data.seq_len, cfg.mlm.rate, cfg.mlm.mask_frac, cfg.mlm.random_frac)
    v = harness.train_variant("esm2", task, cfg, args.workdir, train, valid)
    ev = harness.evaluate(v, valid)
    base = unigram_baseline(train_tokens, valid_tokens)
    params = sum(int(np.size(x)) for x in jax.tree.leaves(v.params))
    table = [{"model": "esm2 mlm", "ppl": float(np.exp(ev["loss"])), "accuracy": float(ev["accuracy"])},
             {"model": "unigram", "ppl": base["ppl"], "accuracy": base["accuracy"]}]
    harness.print_table(table, f"masked-residue perplexity and accuracy, {derived['valid_chains']} held-out chains")
    recs = read_metrics(os.path.join(v.trainer.workdir, "metrics.jsonl"))
    tr, vl = [r for r in recs if r["split"] == "train"], [r for r in recs if r["split"] == "eval"]
    lines = [dict(x=[r["step"] for r in tr], y=[r["loss"] for r in tr], label="train (masked residues)", alpha=0.6)]
    if vl:
        lines.append(dict(x=[r["step"] for r in vl], y=[r["loss"] for r in vl], marker="o",
                          label=f"held-out ({cfg.train.eval_batches} batches)"))
    lines.append(dict(x=[0, cfg.train.steps], y=[np.log(base["ppl"])] * 2, linestyle="--", color="k",
                      label="unigram"))
    harness.plot(os.path.join(args.workdir, "loss.png"), [dict(
        lines=lines, xlabel="step", ylabel="masked-residue loss (nats)",
        title=f"ESM2 d{m.d_model} x{m.num_layers}, {os.path.basename(cfg.data.source)}")])
    results = {"table": table, "eval": ev, "unigram": base, "parameters": params,
               "train_seconds": v.result.train_seconds, "data": cfg.data.source}
    results = harness.write_results(args.workdir, "results.json", results, cfg, derived)
    print(f"\nresults: {os.path.abspath(args.workdir)}  (results.json, loss.png)")
    return results


if __name__ == "__main__":
    harness.run_cli(main)

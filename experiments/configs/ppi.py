"""Configs for `python -m experiments.ppi`: `default` (this CPU, minutes), `tiny` (tests), `paper` (GPU/TPU)."""
from __future__ import annotations

import os

import ml_collections

from jaxemb.train import core_config

PPI = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "ppi"))
VARIANTS = "convbert:ec,convbert:sc,convbert:hp,convbert:pad,finetune:ec,finetune:sc,finetune:hp,finetune:pad"


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    c = core_config()
    # split: a cv5_pdb_split.json (the dataset authors' PDB folds) or "" for PDB/mutant groups computed here
    c.data = dict(source=os.path.join(PPI, "skempi_multichain.csv"), split=os.path.join(PPI, "cv5_pdb_split.json"),
                  fold=0, val_fraction=0.1, test_fraction=0.2, target="abs_log10", limit=0,
                  bucket_quantum=16)  # fine-tuning batches cut to widths 16 x {1, 1.5, 2, 3, ...}; 0: full width
    c.layout = dict(max_chain=66, max_side=160, max_joint=256)
    # the encoder: a local HF ESM2 checkpoint (or hub name), or "" to pretrain this small ESM2 by MLM here
    c.encoder = dict(checkpoint="", tokenizer_style="auto", d_model=64, num_layers=4, num_heads=4, mlp_dim=256, feature_dtype="float32",
                     attention_chunk=0)  # queries per attention chunk (O(chunk x L) memory); 0: whole length
    c.mlm = dict(steps=400, batch_size=32, seq_len=128, lr=2e-3, valid_fraction=0.1)
    c.head = dict(convbert_dropout=0.2, convbert_attn_dropout=0.1, concat_first=True, cross_heads=8,
                  implementation="auto")
    c.study = dict(variants=VARIANTS, seeds=1)
    c.finetune = dict(lr=2e-4, steps=0, lora_rank=0, lora_alpha=32.0)  # steps 0: train.steps; lora_rank 0: full
    c.train.update(steps=300, batch_size=16, log_every=10, eval_every=50, eval_batches=1,
                   checkpoint_every=100, best_metric="spearman", best_mode="max")
    c.optim.update(lr=1e-3, end_lr=1e-4, warmup_steps=20, weight_decay=0.0)
    if name == "default":
        pass
    elif name == "tiny":
        c.data.update(limit=160)
        c.layout.update(max_chain=24, max_side=48, max_joint=64)
        c.encoder.update(d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
        c.mlm.update(steps=4, batch_size=8, seq_len=32)
        c.head.update(cross_heads=2)
        c.train.update(steps=6, batch_size=8, log_every=2, eval_every=3, checkpoint_every=3)
        c.optim.update(warmup_steps=2)
    elif name == "paper":
        # ppiseq's train_config: ESM2-650M, 30 epochs at batch 1 x 32 accumulation, AdamW 5e-4, warm-up 1000,
        # clip 1.0, best validation Spearman; max length 2000; bf16 for fine-tuning. Steps: 30 epochs of the
        # training split at batch 32 (set train.steps to len(train) * 30 // 32 for another dataset).
        c.layout.update(max_chain=2000, max_side=2000, max_joint=2000)
        c.encoder.update(checkpoint="facebook/esm2_t33_650M_UR50D", feature_dtype="bfloat16", attention_chunk=256)
        c.data.update(bucket_quantum=64)  # widths 64 ... 1536, 2000: a dozen compiled shapes
        c.train.update(steps=30 * 4300 // 32, batch_size=32, eval_every=4300 // 32, checkpoint_every=4300 // 32,
                       compute_dtype="float32")
        c.optim.update(lr=5e-4, end_lr=0.0, warmup_steps=1000, clip_norm=1.0, schedule="linear")
        c.finetune.update(lr=5e-4)
        c.study.update(seeds=3)
    else:
        raise ValueError(f"unknown config {name!r}; expected 'default', 'tiny' or 'paper'")
    return c

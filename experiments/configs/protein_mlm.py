"""Configs for `python -m experiments.protein_mlm`: `default` (CPU, minutes) and `tiny` (tests)."""
from __future__ import annotations

import os

import ml_collections

from jaxemb.train import core_config

SKEMPI = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "ppi",
                                       "skempi_multichain.csv"))


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    c = core_config()
    # source: a FASTA file, or a CSV with comma-separated chains in `Ligand Sequences` / `Receptor Sequences`
    c.data = dict(source=SKEMPI, seq_len=128, valid_fraction=0.1)
    c.model = dict(d_model=64, num_layers=4, num_heads=4, mlp_dim=256, token_dropout=False)
    c.mlm = dict(rate=0.15, mask_frac=0.8, random_frac=0.1)
    c.train.update(steps=600, batch_size=32, log_every=10, eval_every=150, eval_batches=4, checkpoint_every=150)
    c.optim.update(lr=2e-3, end_lr=2e-4, warmup_steps=30)
    if name == "default":
        pass
    elif name == "tiny":
        c.data.update(seq_len=32, valid_fraction=0.2)
        c.model.update(d_model=16, num_layers=2, num_heads=2, mlp_dim=32)
        c.train.update(steps=8, batch_size=8, log_every=2, eval_every=4, eval_batches=2, checkpoint_every=4)
        c.optim.update(warmup_steps=2)
    else:
        raise ValueError(f"unknown config {name!r}; expected 'default' or 'tiny'")
    return c

"""Configs for `python -m experiments.lexinvariant`: `default` (CPU, minutes), `tiny` (tests), `paper`."""
from __future__ import annotations

import os

import ml_collections

from jaxemb.train import core_config


SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "text", "tinyshakespeare.txt")


def default_corpora() -> list:
    """The embedded code and prose corpora, plus tiny Shakespeare where ../shared/data is beside the checkout."""
    extra = [os.path.normpath(SHAKESPEARE)] if os.path.exists(SHAKESPEARE) else []
    return ["stdlib", "pydoc"] + extra


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    c = core_config()
    c.data = dict(source="default", tokenizer="byte", spm_vocab_size=32000, max_chars=3_000_000,
                  seq_len=128, valid_fraction=0.05, eval_rows=256, tfds_data_dir="")
    c.model = dict(kind="standard", vocab_size=256, d_model=128, num_layers=4, num_heads=4, head_dim=32,
                   mlp_dim=512, position="rope", tied=True, scale_bias=True, semi_p=0.0, remat=False,
                   readout_block=0, query_blocks=0)  # query_blocks 0: auto; readout_block > 0: lexinvariant readout streamed over vocabulary blocks
    c.study = dict(kinds=["standard", "lexinvariant"], semi_kinds=["standard", "semi0.1", "semi0.2"], bins=8,
                   smooth=9, task_examples=1000, probe_steps=200, probe_hidden=256, decipher_window=32,
                   corpora=default_corpora(), corpora_tokenizers=["byte", "sentencepiece"],
                   corpora_steps=100, corpora_spm_vocab=2048)
    c.train.update(steps=300, batch_size=32, log_every=20, eval_every=150, eval_batches=2,
                   checkpoint_every=150)
    c.optim.update(lr=3e-3, end_lr=3e-4, warmup_steps=40)
    if name == "default":
        pass
    elif name == "tiny":
        c.data.update(max_chars=300_000, seq_len=32, eval_rows=32)
        c.study.update(task_examples=40, probe_steps=4, decipher_window=8, corpora_steps=3, corpora_spm_vocab=400)
        c.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
        c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, checkpoint_every=10)
        c.optim.update(warmup_steps=5)
    elif name == "paper":
        # 150M parameters: 12 layers, 8 heads x 128, MLP 4096, T5 relative position bias, sequence 512,
        # batch 64, Adafactor with cosine decay 1e-2 -> 1e-3 over 250k steps. FSDP over all devices.
        c.data.update(max_chars=0, seq_len=512, eval_rows=2048)
        c.study.update(probe_steps=5000, decipher_window=100, corpora_steps=250_000, corpora_spm_vocab=32000)
        c.model.update(d_model=1024, num_layers=12, num_heads=8, head_dim=128, mlp_dim=4096, position="t5",
                       remat=True)
        c.mesh.shape = dict(data=1, fsdp=-1, tensor=1)
        c.train.update(steps=250_000, batch_size=64, compute_dtype="bfloat16", log_every=100,
                       eval_every=5000, eval_batches=16, checkpoint_every=5000, keep_checkpoints=3)
        c.optim.update(name="adafactor", lr=1e-2, end_lr=1e-3, warmup_steps=10_000, weight_decay=0.0,
                       clip_norm=1.0)
    else:
        raise ValueError(f"unknown config {name!r}; expected 'default', 'tiny' or 'paper'")
    return c

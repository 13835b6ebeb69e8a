"""Configs for `python -m experiments.glyph`: `default` (CPU, minutes), `tiny` (tests), `paper`."""
from __future__ import annotations

import ml_collections

from jaxemb.train import core_config


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    c = core_config()
    # vocab: 'corpus' embeds only the ids that occur in the corpus plus the 4 named specials, renumbered
    # densely (small output head on CPU); 'full' embeds all 65,536 ids (the paper).
    c.data = dict(source="default", max_chars=600_000, seq_len=64, valid_fraction=0.05, tfds_data_dir="",
                  vocab="corpus", ngrams_per_script=256, max_ngrams=1024, astral="surrogates",
                  final_eval_batches=8)
    # glyph.fonts: comma-separated font files, the first that has a glyph wins ('' = Unifont if installed,
    # else matplotlib's DejaVu Sans). augment: fixed-seed rotation/shift/noise/blur before binarising.
    c.glyph = dict(fonts="", cell=32, augment=False, rotate=4.0, shift=1.0, noise=0.05, blur=0.6, seed=0,
                   cache_dir="")
    # projection 'fixed': the builder keeps the top d_model PCA components; 'learned': 1024 -> d_model matrix;
    # 'none': d_model must be 1024. table_dim: columns of the frozen random table (0 = d_model).
    c.model = dict(kind="glyph", vocab_size=65536, d_model=128, num_layers=2, num_heads=4, head_dim=32,
                   mlp_dim=512, position="rope", projection="fixed", table_dim=0, random="gaussian", remat=False,
                   query_blocks=0)  # causal attention query blocks, 0 = auto
    c.study = dict(kinds=["glyph", "trainable", "random"], neighbours=5, queries="O0lI1|oSe")
    c.train.update(steps=150, batch_size=16, log_every=10, eval_every=50, eval_batches=2, checkpoint_every=150)
    c.optim.update(lr=3e-3, end_lr=3e-4, warmup_steps=30)
    if name == "default":
        pass
    elif name == "tiny":
        c.data.update(max_chars=200_000, seq_len=32, max_ngrams=64, ngrams_per_script=32, final_eval_batches=2)
        c.model.update(d_model=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64)
        c.train.update(steps=8, batch_size=8, log_every=2, eval_every=4, checkpoint_every=8)
        c.optim.update(warmup_steps=2)
    elif name == "paper":
        # Bochkov 2025: 16 layers, d_model 1024, 32 heads, RoPE, context 1024, vocabulary 65,536, glyph
        # matrix 65,536 x 1024 used as is. Batch, steps and optimizer are our choices for a GPU/TPU run.
        c.data.update(max_chars=0, seq_len=1024, vocab="full", ngrams_per_script=1024, max_ngrams=0,
                      final_eval_batches=64)
        c.model.update(d_model=1024, num_layers=16, num_heads=32, head_dim=32, mlp_dim=4096, projection="none",
                       remat=True)
        c.mesh.shape = dict(data=1, fsdp=-1, tensor=1)
        c.train.update(steps=100_000, batch_size=64, compute_dtype="bfloat16", log_every=100, eval_every=2000,
                       eval_batches=16, checkpoint_every=2000, keep_checkpoints=3)
        c.optim.update(lr=3e-4, end_lr=3e-5, warmup_steps=2000, weight_decay=0.1)
    else:
        raise ValueError(f"unknown config {name!r}; expected 'default', 'tiny' or 'paper'")
    return c

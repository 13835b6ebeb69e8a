"""Perplexity against context position on several corpora, byte and sentencepiece vocabularies
(paper Figures 3 and 7): `python -m experiments.lexinvariant corpora`.

For each corpus in study.corpora and tokenizer in study.corpora_tokenizers, trains a standard and a
lexinvariant LM (study.corpora_steps steps; sentencepiece vocabulary study.corpora_spm_vocab, trained
locally) in WORKDIR/corpora/<corpus>-<tokenizer>/, evaluates per-position loss on held-out sequences and
overlays all curves in one plot (corpora.png; numbers in corpora.json).
"""
from __future__ import annotations

import copy
import os
import re

import numpy as np

from experiments.common import save_figure, write_json


def _name(source: str) -> str:
    base = os.path.splitext(os.path.basename(source.rstrip("/")))[0] if os.sep in source else source
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def run(cfg, workdir: str) -> dict:
    from experiments.lexinvariant import position_losses, prepare, train_kind
    curves, table = {}, []
    for source in cfg.study.corpora:
        for tokenizer in cfg.study.corpora_tokenizers:
            c = copy.deepcopy(cfg)
            c.data.update(source=source, tokenizer=tokenizer, spm_vocab_size=cfg.study.corpora_spm_vocab)
            c.train.update(steps=cfg.study.corpora_steps,
                           eval_every=min(cfg.train.eval_every, cfg.study.corpora_steps),
                           checkpoint_every=cfg.study.corpora_steps)
            key = f"{_name(source)}-{tokenizer}"
            sub = os.path.join(workdir, "corpora", key)
            os.makedirs(sub, exist_ok=True)
            _, train, valid, rows = prepare(c, sub)
            row = {"corpus": key, "vocab": c.model.vocab_size}
            for kind in cfg.study.kinds:
                task, trainer, state = train_kind(c, kind, train, valid, sub)
                loss = position_losses(task, trainer, state["params"], rows)
                curves[f"{key}/{kind}"] = loss.tolist()
                quarter = max(len(loss) // 4, 1)
                row[f"{kind} first"] = float(np.exp(loss[:quarter].mean()))
                row[f"{kind} last"] = float(np.exp(loss[-quarter:].mean()))
            table.append(row)
    _print(table)
    results = {"curves": curves, "table": table, "steps": cfg.study.corpora_steps,
               "spm_vocab": cfg.study.corpora_spm_vocab, "seq_len": cfg.data.seq_len}
    write_json(os.path.join(workdir, "corpora.json"), results)
    _plot(curves, cfg.study.smooth, os.path.join(workdir, "corpora.png"))
    print(f"\nresults: {os.path.abspath(workdir)}  (corpora.json, corpora.png)")
    return results


def _print(table):
    keys = list(table[0].keys())
    print("\nperplexity per token, first and last quarter of the context (held-out)")
    print("".join(f"{k:>22}" for k in keys))
    for row in table:
        print("".join(f"{row[k]:>22.2f}" if isinstance(row[k], float) else f"{row[k]:>22}" for k in keys))


def _plot(curves, window, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.lexinvariant import smooth
    fig, ax = plt.subplots(figsize=(8, 4.5))
    corpora = sorted({k.split("/")[0] for k in curves})
    colors = {c: f"C{i}" for i, c in enumerate(corpora)}
    for key, loss in curves.items():
        corpus, kind = key.split("/")
        ax.plot(np.arange(1, len(loss) + 1), np.exp(smooth(np.asarray(loss), window)), color=colors[corpus],
                linestyle="-" if kind == "lexinvariant" else "--", label=f"{corpus} {kind}")
    ax.set_xlabel("context position (tokens seen)")
    ax.set_ylabel("perplexity per token (smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    plt.close(fig)

"""Lexinvariant LM studies (Huang et al. 2023): perplexity against context position (Figure 3) and
zero-shot synthetic in-context tasks (Table 1).

    python -m experiments.lexinvariant                       # default: the position study, CPU, minutes
    python -m experiments.lexinvariant tasks                 # LookUp / Permutation on the same models
    python -m experiments.lexinvariant semi                  # semi-lexinvariant p in {0, 0.1, 0.2}: ppl + tasks
    python -m experiments.lexinvariant decipher              # probe + key recovery on ciphered text
    python -m experiments.lexinvariant corpora               # ppl vs position: corpora x {byte, sentencepiece}
    python -m experiments.lexinvariant all                   # every study above (~30 min on a 2-core CPU)
    python -m experiments.lexinvariant --data FILE_OR_DIR    # the same study on your text
    python -m experiments.lexinvariant --config paper        # 150M-parameter config for GPU/TPU
    python -m experiments.lexinvariant train.steps=1000 model.d_model=256   # any config key

Trains a standard and a lexinvariant LM of the same size on the same data (each resumable in
WORKDIR/<kind>), then measures the mean loss at every position over held-out sequences that lie inside
one document, prints a table of position bins x {standard ppl, lexinvariant ppl, ratio}, writes
results.json and perplexity_vs_position.png into WORKDIR.
"""
from __future__ import annotations

import copy
import os
import sys

import numpy as np

from experiments.common import machine, parse_study_args, run_cli, save_figure, write_json
from experiments.configs.lexinvariant import get_config
from jaxemb.data import text
from jaxemb.models.lexinvariant import LanguageModelTask, parameter_count
from jaxemb.train import Trainer


class RowsSource:
    """Fixed evaluation rows (N, L + 1) as batches, in order; the last partial batch is dropped."""

    def __init__(self, rows: np.ndarray, batch_size: int):
        self.rows, self.batch_size = rows, batch_size
        self.num_batches = len(rows) // batch_size
        if self.num_batches == 0:
            raise ValueError(f"{len(rows)} evaluation rows are fewer than one batch of {batch_size}")

    def get(self, index: int, rows: slice = slice(None)) -> dict:
        sel = self.rows[index * self.batch_size:(index + 1) * self.batch_size][rows]
        return text.lm_batch(sel, np.ones_like(sel))


def prepare(cfg, workdir: str):
    """Corpus -> tokenizer -> split -> packed train/valid sources and contiguous evaluation rows."""
    d = cfg.data
    docs = text.load_corpus(d.source, d.max_chars or 10 ** 12, d.tfds_data_dir or None)
    docs = text.chunk_docs(docs)
    train_docs, valid_docs = text.split_docs(docs, d.valid_fraction, cfg.seed)
    if d.tokenizer == "byte":
        tok = text.ByteTokenizer()
    elif d.tokenizer == "sentencepiece":
        tok = text.SentencePieceTokenizer.train(train_docs, d.spm_vocab_size, os.path.join(workdir, "spm.model"))
    else:
        raise ValueError(f"data.tokenizer={d.tokenizer!r}; expected 'byte' or 'sentencepiece'")
    cfg.model.vocab_size = tok.vocab_size
    train_tok = [tok.encode(x) for x in train_docs]
    valid_tok = [tok.encode(x) for x in valid_docs]
    train = text.PackedSource(text.pack(train_tok, d.seq_len), cfg.train.batch_size, cfg.seed)
    valid = text.PackedSource(text.pack(valid_tok, d.seq_len), cfg.train.batch_size, cfg.seed, shuffle=False)
    rows = text.contiguous_rows(valid_tok, d.seq_len, d.eval_rows)
    return tok, train, valid, RowsSource(rows, cfg.train.batch_size)


def train_kind(cfg, kind: str, train, valid, workdir: str):
    """kind: 'standard', 'lexinvariant', or 'semiP' (semi-lexinvariant with substitution probability P)."""
    c = copy.deepcopy(cfg)
    if kind.startswith("semi"):
        try:
            c.model.update(kind="semi", semi_p=float(kind[4:]))
        except ValueError:
            raise ValueError(f"model kind {kind!r}: write semi-lexinvariant kinds as semiP, e.g. semi0.1") from None
    else:
        c.model.kind = kind
    task = LanguageModelTask(c.model, c.data.seq_len)
    trainer = Trainer(task, c, os.path.join(workdir, kind))
    state = trainer.fit(train, valid, desc=kind)
    return task, trainer, state


def position_losses(task, trainer, params, rows: RowsSource) -> np.ndarray:
    """Mean next-token loss (nats) at each position 0..L-1 over the evaluation rows."""
    outs = trainer.map_batches(task.position_nll, params, rows, rows.num_batches)
    return np.concatenate(outs).mean(axis=0)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return x
    pad = window // 2
    padded = np.pad(x, pad, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")[:len(x)]


def bin_table(losses: dict, bins: int) -> list[dict]:
    length = len(next(iter(losses.values())))
    edges = np.linspace(0, length, bins + 1).astype(int)
    table = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = {"positions": f"{lo + 1}-{hi}"}
        for k, v in losses.items():
            row[k] = float(np.exp(v[lo:hi].mean()))
        if "standard" in losses and "lexinvariant" in losses:
            row["ratio"] = row["lexinvariant"] / row["standard"]
        table.append(row)
    return table


def print_table(table: list[dict], unit: str) -> None:
    keys = list(table[0].keys())
    print(f"\nperplexity per {unit} by context position (held-out)")
    print("  ".join(f"{k:>12}" for k in keys))
    for row in table:
        print("  ".join(f"{row[k]:>12.3f}" if isinstance(row[k], float) else f"{row[k]:>12}" for k in keys))


def plot(losses: dict, window: int, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, v in losses.items():
        pos = np.arange(1, len(v) + 1)
        ax.plot(pos, np.exp(smooth(v, window)), label=k)
    ax.set_xlabel("context position (tokens seen)")
    ax.set_ylabel("perplexity (smoothed)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


STUDIES = ("position", "tasks", "semi", "decipher", "corpora", "all")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    study = argv.pop(0) if argv and argv[0] in STUDIES else "position"
    args, cfg = parse_study_args(__doc__.splitlines()[0], get_config, "runs/lexinvariant", argv)
    if study == "all":  # every study, sharing the trained models in one workdir
        return {s: run_study(s, copy.deepcopy(cfg), args.workdir) for s in STUDIES[:-1]}
    return run_study(study, cfg, args.workdir)


def run_study(study: str, cfg, workdir: str) -> dict:
    if study == "corpora":
        from experiments import lexinvariant_corpora
        return lexinvariant_corpora.run(cfg, workdir)
    tok, train, valid, rows = prepare(cfg, workdir)
    kinds = {"semi": cfg.study.semi_kinds, "decipher": ["lexinvariant"]}.get(study, cfg.study.kinds)
    models = {kind: train_kind(cfg, kind, train, valid, workdir) for kind in kinds}
    if study == "decipher":
        from experiments import lexinvariant_decipher
        task, _, state = models["lexinvariant"]
        return lexinvariant_decipher.run(cfg, task, state, train, rows, workdir)
    if study in ("tasks", "semi"):
        from experiments import lexinvariant_tasks
        sample = "".join(tok.decode(train.tokens[i]) for i in range(min(200, train.num_rows)))
        accuracy = lexinvariant_tasks.run(cfg, models, tok, sample, workdir, name=study)
        if study == "tasks":
            return accuracy
    losses, info = {}, {}
    for kind, (task, trainer, state) in models.items():
        losses[kind] = position_losses(task, trainer, state["params"], rows)
        info[kind] = {"parameters": parameter_count(state["params"]),
                      "train_seconds": getattr(trainer, "train_seconds", None),
                      "mean_ppl": float(np.exp(losses[kind].mean()))}
    table = bin_table(losses, cfg.study.bins)
    unit = "byte" if cfg.data.tokenizer == "byte" else "token"
    print_table(table, unit)
    results = {
        "positions": list(range(1, cfg.data.seq_len + 1)),
        "ppl": {k: np.exp(smooth(v, 1)).tolist() for k, v in losses.items()},
        "loss": {k: v.tolist() for k, v in losses.items()},
        "table": table, "models": info, "eval_rows": int(rows.num_batches * rows.batch_size),
        "data": cfg.data.source, "tokenizer": cfg.data.tokenizer, "machine": machine(),
        "config": cfg.to_dict(),
    }
    prefix = "" if study == "position" else f"{study}_"
    if study == "semi":
        results["tasks"] = accuracy
    write_json(os.path.join(workdir, f"{prefix}results.json"), results)
    plot(losses, cfg.study.smooth, os.path.join(workdir, f"{prefix}perplexity_vs_position.png"),
         f"{cfg.data.source} ({unit}-level), {cfg.train.steps} steps")
    print(f"\nresults: {os.path.abspath(workdir)}  ({prefix}results.json, {prefix}perplexity_vs_position.png)")
    return results


if __name__ == "__main__":
    run_cli(main)

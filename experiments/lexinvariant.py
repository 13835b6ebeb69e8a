"""Lexinvariant LM studies (Huang et al. 2023): perplexity against context position (Figure 3), zero-shot
synthetic in-context tasks (Table 1), the semi-lexinvariant sweep, deciphering and several corpora.

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
results.json and perplexity_vs_position.png into WORKDIR. `corpora` does the same for every corpus and
tokenizer of study.corpora x study.corpora_tokenizers in WORKDIR/corpora/<corpus>-<tokenizer>/ and overlays
the curves (corpora.json, corpora.png).
"""
from __future__ import annotations

import os
import re
import sys
from types import SimpleNamespace

import numpy as np

from experiments import harness, lexinvariant_decipher, lexinvariant_tasks
from experiments.configs.lexinvariant import get_config
from jaxemb.data import text
from jaxemb.models.lexinvariant import LanguageModelTask, parameter_count

STUDIES = ("position", "tasks", "semi", "decipher", "corpora", "all")


def prepare(cfg, workdir: str) -> SimpleNamespace:
    """Corpus -> tokenizer -> split -> packed train/valid sources, evaluation rows and derived values."""
    d = cfg.data
    docs = text.chunk_docs(text.load_corpus(d.source, d.max_chars or 10 ** 12, d.tfds_data_dir or None))
    train_docs, valid_docs = text.split_docs(docs, d.valid_fraction, cfg.seed)
    if d.tokenizer == "byte":
        tok = text.ByteTokenizer()
    elif d.tokenizer == "sentencepiece":
        tok = text.SentencePieceTokenizer.train(train_docs, d.spm_vocab_size, os.path.join(workdir, "spm.model"))
    else:
        raise ValueError(f"data.tokenizer={d.tokenizer!r}; expected 'byte' or 'sentencepiece'")
    train_tok, valid_tok = [tok.encode(x) for x in train_docs], [tok.encode(x) for x in valid_docs]
    b = cfg.train.batch_size
    return SimpleNamespace(
        tok=tok, derived={"vocab_size": tok.vocab_size},
        train=text.PackedSource(text.pack(train_tok, d.seq_len), b, cfg.seed),
        valid=text.PackedSource(text.pack(valid_tok, d.seq_len), b, cfg.seed, shuffle=False),
        rows=text.RowsSource(text.contiguous_rows(valid_tok, d.seq_len, d.eval_rows), b))


def train_kind(cfg, kind: str, data, workdir: str) -> harness.Variant:
    """kind: 'standard', 'lexinvariant', or 'semiP' (semi-lexinvariant with substitution probability P)."""
    settings = {"model.vocab_size": data.derived["vocab_size"], "model.kind": kind}
    if kind.startswith("semi"):
        try:
            settings.update({"model.kind": "semi", "model.semi_p": float(kind[4:])})
        except ValueError:
            raise ValueError(f"model kind {kind!r}: write semi-lexinvariant kinds as semiP, e.g. semi0.1") from None
    c = harness.with_settings(cfg, **settings)
    return harness.train_variant(kind, LanguageModelTask(c.model, c.data.seq_len), c, workdir, data.train,
                                 data.valid)


def position_losses(variant, rows) -> np.ndarray:
    """Mean next-token loss (nats) at each position 0..L-1 over the evaluation rows."""
    return harness.map_rows(variant, variant.task.position_nll, rows).mean(axis=0)


def bin_table(losses: dict, bins: int) -> list[dict]:
    length = len(next(iter(losses.values())))
    edges = np.linspace(0, length, bins + 1).astype(int)
    table = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = {"positions": f"{lo + 1}-{hi}", **{k: float(np.exp(v[lo:hi].mean())) for k, v in losses.items()}}
        if "standard" in losses and "lexinvariant" in losses:
            row["ratio"] = row["lexinvariant"] / row["standard"]
        table.append(row)
    return table


def ppl_lines(curves: dict, window: int, style=lambda key: {}) -> list:
    return [dict(x=np.arange(1, len(v) + 1), y=np.exp(harness.smooth(np.asarray(v), window)), label=k, **style(k))
            for k, v in curves.items()]


def main(argv=None) -> dict:
    args, cfg = harness.parse(sys.argv[1:] if argv is None else argv, __doc__.splitlines()[0], get_config,
                              "runs/lexinvariant", commands=STUDIES)
    study = args.command or "position"
    if study == "all":  # every study, sharing the trained models in one workdir
        return {s: run_study(s, cfg, args.workdir) for s in STUDIES[:-1]}
    return run_study(study, cfg, args.workdir)


def run_study(study: str, cfg, workdir: str) -> dict:
    if study == "corpora":
        return corpora(cfg, workdir)
    data = prepare(cfg, workdir)
    kinds = {"semi": cfg.study.semi_kinds, "decipher": ["lexinvariant"]}.get(study, cfg.study.kinds)
    models = {kind: train_kind(cfg, kind, data, workdir) for kind in kinds}
    if study == "decipher":
        return lexinvariant_decipher.run(cfg, models["lexinvariant"], data, workdir)
    if study in ("tasks", "semi"):
        sample = "".join(data.tok.decode(t) for t in data.train.arrays["tokens"][:200])
        accuracy = lexinvariant_tasks.run(cfg, models, data.tok, sample, workdir, name=study)
        if study == "tasks":
            return accuracy
    losses = {kind: position_losses(v, data.rows) for kind, v in models.items()}
    info = {kind: {"parameters": parameter_count(v.params), "train_seconds": v.result.train_seconds,
                   "mean_ppl": float(np.exp(losses[kind].mean()))} for kind, v in models.items()}
    table = bin_table(losses, cfg.study.bins)
    unit = "byte" if cfg.data.tokenizer == "byte" else "token"
    harness.print_table(table, f"perplexity per {unit} by context position (held-out)")
    results = {"positions": list(range(1, cfg.data.seq_len + 1)), "ppl": {k: np.exp(v).tolist() for k, v in losses.items()},
               "loss": {k: v.tolist() for k, v in losses.items()}, "table": table, "models": info,
               "eval_rows": data.rows.num_rows, "data": cfg.data.source, "tokenizer": cfg.data.tokenizer}
    if study == "semi":
        results["tasks"] = accuracy
    prefix = "" if study == "position" else f"{study}_"
    results = harness.write_results(workdir, f"{prefix}results.json", results, cfg, data.derived)
    harness.plot(os.path.join(workdir, f"{prefix}perplexity_vs_position.png"), [dict(
        lines=ppl_lines(losses, cfg.study.smooth), xlabel="context position (tokens seen)", yscale="log",
        ylabel="perplexity (smoothed)", title=f"{cfg.data.source} ({unit}-level), {cfg.train.steps} steps")])
    print(f"\nresults: {os.path.abspath(workdir)}  ({prefix}results.json, {prefix}perplexity_vs_position.png)")
    return results


def _name(source: str) -> str:
    base = os.path.splitext(os.path.basename(source.rstrip("/")))[0] if os.sep in source else source
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def corpora(cfg, workdir: str) -> dict:
    """Position curves for every corpus x tokenizer (study.corpora_steps steps per model)."""
    curves, table, steps = {}, [], cfg.study.corpora_steps
    for source in cfg.study.corpora:
        for tokenizer in cfg.study.corpora_tokenizers:
            c = harness.with_settings(cfg, **{
                "data.source": source, "data.tokenizer": tokenizer, "data.spm_vocab_size": cfg.study.corpora_spm_vocab,
                "train.steps": steps, "train.eval_every": min(cfg.train.eval_every, steps),
                "train.checkpoint_every": steps})
            key = f"{_name(source)}-{tokenizer}"
            sub = harness.ensure_dir(os.path.join(workdir, "corpora", key))
            data = prepare(c, sub)
            row = {"corpus": key, "vocab": data.derived["vocab_size"]}
            for kind in cfg.study.kinds:
                loss = position_losses(train_kind(c, kind, data, sub), data.rows)
                curves[f"{key}/{kind}"] = loss.tolist()
                quarter = max(len(loss) // 4, 1)
                row[f"{kind} first"] = float(np.exp(loss[:quarter].mean()))
                row[f"{kind} last"] = float(np.exp(loss[-quarter:].mean()))
            table.append(row)
    harness.print_table(table, "perplexity per token, first and last quarter of the context (held-out)",
                        width=20, fmt=".2f")
    results = harness.write_results(workdir, "corpora.json", {
        "curves": curves, "table": table, "steps": steps, "spm_vocab": cfg.study.corpora_spm_vocab,
        "seq_len": cfg.data.seq_len}, cfg)
    colors = {c: f"C{i}" for i, c in enumerate(sorted({k.split("/")[0] for k in curves}))}
    style = lambda key: dict(color=colors[key.split("/")[0]], linestyle="-" if key.endswith("/lexinvariant") else "--")
    harness.plot(os.path.join(workdir, "corpora.png"), [dict(
        lines=ppl_lines(curves, cfg.study.smooth, style), xlabel="context position (tokens seen)",
        ylabel="perplexity per token (smoothed)", yscale="log", legend_size=7)], figsize=(8, 4.5))
    print(f"\nresults: {os.path.abspath(workdir)}  (corpora.json, corpora.png)")
    return results


if __name__ == "__main__":
    harness.run_cli(main)

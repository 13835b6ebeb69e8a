"""Frozen visual Unicode-glyph embeddings vs trainable vs frozen random (Bochkov 2025).

    python -m experiments.glyph                               # default: CPU, minutes, no network
    python -m experiments.glyph --font FILE.ttf --cache-dir DIR
    python -m experiments.glyph --config paper                # 16 x 1024, 32 heads, context 1024, V = 65,536
    python -m experiments.glyph train.steps=1000 model.d_model=256   # any config key

Learns the tokenizer's n-grams from the training documents, builds (or loads from the cache) the glyph
matrix, trains (a) frozen glyph, (b) trainable and (c) frozen random embeddings at the same size (each
resumable in WORKDIR/<kind>), prints validation loss and bits per character, a nearest-neighbour table of
glyph embeddings and Latin / Cyrillic / Greek / CJK text encoded and rendered; writes results.json,
curves.png and tokenizer.json into WORKDIR. The default config embeds only the ids that occur in the corpus
(plus the specials), renumbered densely, and fits the PCA over those; `paper` embeds all 65,536.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np

from experiments.common import machine, parse_study_args, run_cli, save_figure, write_json
from experiments.configs.glyph import get_config
from jaxemb.data import glyphs, text
from jaxemb.data.unicode_tokenizer import NUM_SPECIAL, SPECIAL_BASE, UnicodeTokenizer
from jaxemb.models.glyph import GlyphLMTask
from jaxemb.models.lexinvariant import parameter_count
from jaxemb.train import Trainer
from jaxemb.train.metrics import read_metrics

SAMPLES = {"Latin": "Quick brown fox", "Cyrillic": "Съешь же ещё", "Greek": "Γαζέες καὶ", "CJK": "天地玄黃"}


def prepare(cfg, workdir: str):
    """Corpus -> split -> tokenizer -> (compact) vocabulary -> packed train / valid sources."""
    d = cfg.data
    docs = text.chunk_docs(text.load_corpus(d.source, d.max_chars or 10 ** 12, d.tfds_data_dir or None))
    train_docs, valid_docs = text.split_docs(docs, d.valid_fraction, cfg.seed)
    tok = UnicodeTokenizer.train(train_docs, d.ngrams_per_script, d.max_ngrams or None, d.astral)
    tok.save(os.path.join(workdir, "tokenizer.json"))
    train_tok = [tok.encode(x, errors="replace") for x in train_docs]
    valid_tok = [tok.encode(x, errors="replace") for x in valid_docs]
    if d.vocab == "full":
        ids = np.arange(tok.vocab_size)
    elif d.vocab == "corpus":
        ids = np.union1d(np.concatenate(train_tok + valid_tok), SPECIAL_BASE + np.arange(4))
    else:
        raise ValueError(f"data.vocab={d.vocab!r}; expected 'corpus' or 'full'")
    dense = np.zeros(tok.vocab_size, np.int32)
    dense[ids] = np.arange(len(ids))
    cfg.model.vocab_size = len(ids)
    train = text.PackedSource(text.pack([dense[t] for t in train_tok], d.seq_len), cfg.train.batch_size, cfg.seed)
    valid = text.PackedSource(text.pack([dense[t] for t in valid_tok], d.seq_len), cfg.train.batch_size, cfg.seed,
                              shuffle=False)
    return tok, ids, train, valid


def font_paths(cfg) -> list:
    return [p for p in cfg.glyph.fonts.split(",") if p] or [glyphs.default_font_path()]


def glyph_matrix(cfg, tok, ids, dim: int) -> np.ndarray:
    g = cfg.glyph
    augment = dict(rotate=g.rotate, shift=g.shift, noise=g.noise, blur=g.blur) if g.augment else None
    return glyphs.build_glyph_matrix(tok, ids, font_paths(cfg), g.cell, augment, g.seed, dim, g.cache_dir or None)


def train_kind(cfg, kind, table, char_lengths, train, valid, workdir):
    c = copy.deepcopy(cfg)
    c.model.kind = kind
    task = GlyphLMTask(c.model, c.data.seq_len, table if kind == "glyph" else None, char_lengths)
    trainer = Trainer(task, c, os.path.join(workdir, kind))
    state = trainer.fit(train, valid, desc=kind)
    n = min(cfg.data.final_eval_batches, valid.batches_per_epoch)
    sums = trainer.map_batches(task.sums, state["params"], valid, n)
    nll, tokens, chars = (sum(float(s[k]) for s in sums) for k in ("nll", "tokens", "chars"))
    frozen = sum(x.size for p, x in _leaves(state["params"]) if task.frozen(p))
    return {"valid_loss": nll / tokens, "bits_per_token": nll / tokens / np.log(2), "bits_per_char":
            nll / chars / np.log(2), "valid_tokens": int(tokens), "parameters": parameter_count(state["params"]),
            "frozen_parameters": int(frozen), "train_seconds": getattr(trainer, "train_seconds", None)}


def _leaves(params):
    import jax
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in p), x) for p, x in flat]


def neighbours(cfg, tok, ids, queries: str, k: int) -> tuple[dict, int]:
    """Cosine nearest neighbours of each query character among the single characters of the vocabulary
    plus printable ASCII and the queries, on 1024-d glyph vectors with the PCA fitted over that set."""
    singles = [int(i) for i in ids if len(tok.token_text(i)) == 1 and i < SPECIAL_BASE]
    probe = np.union1d(singles + [ord(q) for q in queries], np.arange(0x21, 0x7F))
    matrix = glyph_matrix(cfg, tok, probe, cfg.glyph.cell ** 2)
    out = {}
    for q in queries:
        sims = matrix @ matrix[np.searchsorted(probe, ord(q))]
        best = [j for j in np.argsort(-sims, kind="stable") if probe[j] != ord(q)][:k]
        out[q] = [(chr(probe[j]), float(sims[j])) for j in best]
    return out, len(probe)


def ascii_cells(cells, step: int = 2) -> list[str]:
    """Glyph cells side by side as text lines ('#' ink), downsampled by `step`."""
    lines = []
    for r in range(0, cells[0].shape[0], step):
        lines.append("  ".join("".join("#" if v >= 128 else "." for v in c[r, ::step]) for c in cells))
    return lines


def show_scripts(tok, renderer) -> dict:
    out = {}
    print("\nscripts: encode -> tokens -> decode, and glyphs of the first characters")
    for name, s in SAMPLES.items():
        ids = tok.encode(s)
        ok = tok.decode(ids) == s
        out[name] = {"text": s, "ids": ids.tolist(), "round_trip": ok}
        print(f"  {name:9s} {s!r:24s} -> {len(ids):2d} ids {[f'U+{i:04X}' for i in ids[:4]]}...  "
              f"round trip {'ok' if ok else 'FAILED'}")
    cells = [renderer.text(s[0]) for s in SAMPLES.values()]
    print("\n".join("    " + line for line in ascii_cells(cells)))
    return out


def plot(workdir: str, kinds, path: str, title: str, eval_batches: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, kind in enumerate(kinds):
        recs = os.path.join(workdir, kind, "metrics.jsonl")
        tr, ev = read_metrics(recs, "train"), read_metrics(recs, "eval")
        color = f"C{i}"
        ax.plot([r["step"] for r in tr], [r["bits_per_char"] for r in tr], color=color, alpha=0.45,
                label=f"{kind} train")
        if ev:
            ax.plot([r["step"] for r in ev], [r["bits_per_char"] for r in ev], "o-", color=color,
                    label=f"{kind} valid ({eval_batches} batches)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def _extra_flags(argv):
    """--font and --cache-dir become glyph.fonts / glyph.cache_dir overrides."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--font", default=None)
    p.add_argument("--cache-dir", default=None)
    known, rest = p.parse_known_args(argv)
    if known.font is not None:
        rest.append(f"glyph.fonts={known.font}")
    if known.cache_dir is not None:
        rest.append(f"glyph.cache_dir={known.cache_dir}")
    return rest


def main(argv=None) -> dict:
    argv = _extra_flags(sys.argv[1:] if argv is None else list(argv))
    args, cfg = parse_study_args(__doc__.splitlines()[0], get_config, "runs/glyph", argv)
    workdir = args.workdir
    started = time.perf_counter()
    for p in font_paths(cfg):  # fail early, with the install hint, before any training
        glyphs.open_font(p, cfg.glyph.cell)
    tok, ids, train, valid = prepare(cfg, workdir)
    m = cfg.model
    dim = m.d_model if m.projection in ("fixed", "none") else cfg.glyph.cell ** 2
    t = time.perf_counter()
    table = glyph_matrix(cfg, tok, ids, dim)
    build_seconds = time.perf_counter() - t
    print(f"vocabulary {len(ids):,} ids ({len(tok.ngrams)} n-grams); glyph matrix {table.shape} "
          f"built or loaded in {build_seconds:.1f}s from {', '.join(font_paths(cfg))}")
    char_lengths = tok.char_lengths()[ids]
    models = {}
    for kind in cfg.study.kinds:
        models[kind] = train_kind(cfg, kind, table, char_lengths, train, valid, workdir)
    print(f"\nvalidation ({cfg.data.source}, {cfg.train.steps} steps, d_model {m.d_model}, {m.num_layers} layers)")
    print(f"{'embedding':>10}  {'params':>10}  {'frozen':>9}  {'loss/token':>10}  {'bits/char':>9}  {'train s':>7}")
    for kind, r in models.items():
        print(f"{kind:>10}  {r['parameters']:>10,}  {r['frozen_parameters']:>9,}  {r['valid_loss']:>10.4f}  "
              f"{r['bits_per_char']:>9.4f}  {r['train_seconds'] or 0:>7.1f}")
    nn_table, n_probe = neighbours(cfg, tok, ids, cfg.study.queries, cfg.study.neighbours)
    print(f"\nnearest glyph neighbours (cosine of {cfg.glyph.cell ** 2}-d glyph vectors, among {n_probe} single "
          "characters: the vocabulary's, printable ASCII, the queries)")
    for q, row in nn_table.items():
        print(f"  {q!r:5s} " + "  ".join(f"{c!r} {s:.2f}" for c, s in row))
    renderer = glyphs.Renderer([glyphs.open_font(p, cfg.glyph.cell) for p in font_paths(cfg)], cfg.glyph.cell)
    scripts = show_scripts(tok, renderer)
    results = {"models": models, "neighbours": nn_table, "scripts": scripts, "vocab_size": int(len(ids)),
               "ngrams": len(tok.ngrams), "specials": NUM_SPECIAL, "glyph_shape": list(table.shape),
               "glyph_build_seconds": build_seconds, "fonts": font_paths(cfg), "data": cfg.data.source,
               "machine": machine(), "config": cfg.to_dict(), "seconds": time.perf_counter() - started}
    write_json(os.path.join(workdir, "results.json"), results)
    plot(workdir, list(models), os.path.join(workdir, "curves.png"),
         f"{cfg.data.source}: frozen glyph vs trainable vs frozen random", cfg.train.eval_batches)
    print(f"\nresults: {os.path.abspath(workdir)}  (results.json, curves.png, tokenizer.json)  "
          f"in {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    run_cli(main)

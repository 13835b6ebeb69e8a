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

import os
import sys
import time

import numpy as np

from experiments import harness
from experiments.configs.glyph import get_config
from jaxemb.data import glyphs, text
from jaxemb.data.unicode_tokenizer import NUM_SPECIAL, SPECIAL_BASE, UnicodeTokenizer
from jaxemb.models.glyph import GlyphLMTask
from jaxemb.train.metrics import read_metrics

SAMPLES = {"Latin": "Quick brown fox", "Cyrillic": "Съешь же ещё", "Greek": "Γαζέες καὶ", "CJK": "天地玄黃"}


def prepare(cfg, workdir: str):
    """Corpus -> split -> tokenizer -> (compact) vocabulary -> (tok, ids, packed train / valid sources)."""
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
    pack = lambda toks: text.pack([dense[t] for t in toks], d.seq_len)
    return (tok, ids, text.PackedSource(pack(train_tok), cfg.train.batch_size, cfg.seed),
            text.PackedSource(pack(valid_tok), cfg.train.batch_size, cfg.seed, shuffle=False))


def font_paths(cfg) -> list:
    return [p for p in cfg.glyph.fonts.split(",") if p] or [glyphs.default_font_path()]


def glyph_matrix(cfg, tok, ids, dim: int) -> np.ndarray:
    g = cfg.glyph
    augment = dict(rotate=g.rotate, shift=g.shift, noise=g.noise, blur=g.blur) if g.augment else None
    return glyphs.build_glyph_matrix(tok, ids, font_paths(cfg), g.cell, augment, g.seed, dim, g.cache_dir or None)


def train_kind(cfg, kind, table, char_lengths, train, valid, workdir):
    c = harness.with_settings(cfg, **{"model.kind": kind, "model.vocab_size": len(char_lengths)})
    task = GlyphLMTask(c.model, c.data.seq_len, table if kind == "glyph" else None, char_lengths)
    v = harness.train_variant(kind, task, c, workdir, train, valid)
    n = min(cfg.data.final_eval_batches, valid.num_batches)
    sums = v.trainer.map_batches(task.sums, v.params, valid, n)
    nll, tokens, chars = (sum(float(s[k]) for s in sums) for k in ("nll", "tokens", "chars"))
    return {"valid_loss": nll / tokens, "bits_per_token": nll / tokens / np.log(2), "bits_per_char":
            nll / chars / np.log(2), "valid_tokens": int(tokens), **task.parameter_counts(v.params),
            "train_seconds": v.result.train_seconds}


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


def curves(workdir: str, kinds, eval_batches: int) -> list:
    """Train and validation bits per character of each variant, from its metrics.jsonl."""
    lines = []
    for i, kind in enumerate(kinds):
        recs = os.path.join(workdir, kind, "metrics.jsonl")
        tr, ev = read_metrics(recs, "train"), read_metrics(recs, "eval")
        lines.append(dict(x=[r["step"] for r in tr], y=[r["bits_per_char"] for r in tr], color=f"C{i}", alpha=0.45,
                          label=f"{kind} train"))
        if ev:
            lines.append(dict(x=[r["step"] for r in ev], y=[r["bits_per_char"] for r in ev], color=f"C{i}",
                              marker="o", label=f"{kind} valid ({eval_batches} batches)"))
    return lines


OPTIONS = {"--font": ("glyph.fonts", "font file(s), comma-separated (glyph.fonts)"),
           "--cache-dir": ("glyph.cache_dir", "glyph matrix cache directory (glyph.cache_dir)")}


def main(argv=None) -> dict:
    args, cfg = harness.parse(sys.argv[1:] if argv is None else argv, __doc__.splitlines()[0], get_config,
                              "runs/glyph", options=OPTIONS)
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
    models = {kind: train_kind(cfg, kind, table, char_lengths, train, valid, workdir) for kind in cfg.study.kinds}
    harness.print_table([{"embedding": k, "params": r["parameters"], "frozen": r["frozen_parameters"],
                          "loss/token": r["valid_loss"], "bits/char": r["bits_per_char"], "train s": r["train_seconds"]}
                         for k, r in models.items()], f"validation ({cfg.data.source}, {cfg.train.steps} steps, "
                        f"d_model {m.d_model}, {m.num_layers} layers)", width=10, fmt=".4f", formats={"train s": ".1f"})
    nn_table, n_probe = neighbours(cfg, tok, ids, cfg.study.queries, cfg.study.neighbours)
    print(f"\nnearest glyph neighbours (cosine of {cfg.glyph.cell ** 2}-d glyph vectors, among {n_probe} single "
          "characters: the vocabulary's, printable ASCII, the queries)")
    for q, row in nn_table.items():
        print(f"  {q!r:5s} " + "  ".join(f"{c!r} {s:.2f}" for c, s in row))
    renderer = glyphs.Renderer([glyphs.open_font(p, cfg.glyph.cell) for p in font_paths(cfg)], cfg.glyph.cell)
    scripts = show_scripts(tok, renderer)
    results = harness.write_results(workdir, "results.json", {
        "models": models, "neighbours": nn_table, "scripts": scripts, "vocab_size": int(len(ids)),
        "ngrams": len(tok.ngrams), "specials": NUM_SPECIAL, "glyph_shape": list(table.shape),
        "glyph_build_seconds": build_seconds, "fonts": font_paths(cfg), "data": cfg.data.source,
        "seconds": time.perf_counter() - started}, cfg, {"vocab_size": int(len(ids))})
    harness.plot(os.path.join(workdir, "curves.png"), [dict(
        lines=curves(workdir, list(models), cfg.train.eval_batches), xlabel="step", ylabel="bits per character",
        title=f"{cfg.data.source}: frozen glyph vs trainable vs frozen random")])
    print(f"\nresults: {os.path.abspath(workdir)}  (results.json, curves.png, tokenizer.json)  "
          f"in {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    harness.run_cli(main)

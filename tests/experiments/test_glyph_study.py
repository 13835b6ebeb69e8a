import json
import os

from experiments import glyph
from jaxemb.data.unicode_tokenizer import UnicodeTokenizer
from cli_check import assert_usage_error

LINES = ["the quick brown fox jumps over the lazy dog {i}", "Съешь же ещё этих мягких булок {i}",
         "Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ {i}", "天地玄黃 宇宙洪荒 {i}", "O0 l1I| oO0 {i}"]


def test_study_trains_three_embeddings_and_writes_results(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(LINES[i % 5].format(i=i) + "\n" for i in range(2500)), encoding="utf-8")
    wd = tmp_path / "run"
    res = glyph.main(["--config", "tiny", "--workdir", str(wd), "--data", str(corpus), "--cache-dir",
                      str(tmp_path / "cache"), "train.steps=4", "train.eval_every=0", "train.progress=False",
                      "mesh.num_devices=1"])
    out = capsys.readouterr().out
    for word in ("glyph", "trainable", "random", "bits/char", "nearest glyph neighbours", "Cyrillic", "CJK"):
        assert word in out, word
    assert "FAILED" not in out and str(wd) in out
    saved = json.load(open(wd / "results.json"))
    assert set(saved["models"]) == {"glyph", "trainable", "random"}
    sizes = {k: (m["parameters"], m["valid_tokens"]) for k, m in saved["models"].items()}
    assert len(set(sizes.values())) == 1  # same size, same validation tokens
    assert saved["models"]["glyph"]["frozen_parameters"] == saved["vocab_size"] * 32
    assert saved["models"]["trainable"]["frozen_parameters"] == 0
    assert all(1 < m["bits_per_char"] < 20 for m in saved["models"].values())
    assert all(s["round_trip"] for s in saved["scripts"].values())
    assert {"O", "0", "l", "1", "I"} <= set(saved["neighbours"])
    assert (wd / "curves.png").stat().st_size > 5000
    tok = UnicodeTokenizer.load(str(wd / "tokenizer.json"))
    assert any(g in tok.ngram_ids for g in ("天地", "ещ", "the")) and res["ngrams"] == len(tok.ngrams)
    assert os.listdir(tmp_path / "cache")  # the glyph matrix is cached


def test_cli_missing_font_is_one_clear_line(tmp_path):
    assert_usage_error("experiments.glyph", ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--font",
                                             str(tmp_path / "missing.ttf")], "missing.ttf", "apt-get install unifont",
                       one_line=False)

import json

import pytest

from experiments import lexinvariant
from experiments.configs.lexinvariant import get_config
from jaxemb.config import apply_overrides
from cli_check import assert_usage_error



def test_study_writes_table_results_and_plot(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3000)))
    wd = tmp_path / "run"
    res = lexinvariant.main(["--config", "tiny", "--workdir", str(wd), "--data", str(corpus),
                             "train.steps=6", "train.eval_every=3", "train.progress=False"])
    out = capsys.readouterr().out
    assert "standard" in out and "lexinvariant" in out and "ratio" in out and str(wd) in out
    saved = json.load(open(wd / "results.json"))
    assert saved["positions"] == list(range(1, 33))
    assert set(saved["ppl"]) == {"standard", "lexinvariant"}
    assert all(len(v) == 32 and min(v) > 1 for v in saved["ppl"].values())
    assert res["table"][0]["ratio"] > 0
    assert (wd / "perplexity_vs_position.png").stat().st_size > 5000


def test_unknown_config_key_is_a_clear_error():
    cfg = get_config("default")
    with pytest.raises(KeyError, match="unknown config key 'train.stepz'"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(KeyError, match="unknown config key 'modell'"):
        apply_overrides(cfg, ["modell.kind=x"])
    with pytest.raises(ValueError, match="expects int"):
        apply_overrides(cfg, ["train.steps=abc"])


def test_cli_reports_bad_input_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, msg in [(["--data", str(empty)], "holds no non-empty text files"),
                      (["train.stepz=2", "--data", "pydoc"], "unknown config key"),  # overrides and options mix
                      (["data.seq_len=1"], "sequence length must be >= 2")]:
        assert_usage_error("experiments.lexinvariant", ["--config", "tiny", "--workdir", str(tmp_path / "w"), *args], msg, one_line=False)


def test_paper_config_is_150m_parameters():
    import jax
    import numpy as np
    from jaxemb.models.lexinvariant import LanguageModelTask
    cfg = get_config("paper")
    task = LanguageModelTask(cfg.model, cfg.data.seq_len)
    batch = {"inputs": jax.ShapeDtypeStruct((1, 512), np.int32), "segment_ids": jax.ShapeDtypeStruct((1, 512), np.int32)}
    shapes = jax.eval_shape(task.init, jax.random.key(0), batch)
    import flax.linen as nn
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert 140e6 < n < 160e6, n
    assert cfg.optim.name == "adafactor" and cfg.model.position == "t5" and cfg.train.steps == 250_000


def test_tasks_study_reuses_models_and_writes_table(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"k{i % 7}->v{i % 5} " * 3 + "\n" for i in range(4000)))
    wd = tmp_path / "run"
    table = lexinvariant.main(["tasks", "--config", "tiny", "--workdir", str(wd), "--data", str(corpus),
                               "train.steps=4", "train.progress=False"])
    out = capsys.readouterr().out
    assert "lookup/uniform" in out and "permutation/frequency" in out
    assert set(table) == {"lookup/uniform", "lookup/frequency", "permutation/uniform", "permutation/frequency"}
    assert all(0.0 <= v <= 1.0 for row in table.values() for v in row.values())
    saved = json.load(open(wd / "tasks.json"))
    assert saved["examples"] == 40 and (wd / "tasks.png").stat().st_size > 3000
    assert (wd / "standard" / "checkpoints").is_dir()


def test_semi_study_trains_p_values_and_reports_ppl_and_tasks(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"a{i % 9} = b{i % 4}\n" for i in range(8000)))
    wd = tmp_path / "run"
    res = lexinvariant.main(["semi", "--config", "tiny", "--workdir", str(wd), "--data", str(corpus),
                             "train.steps=3", "train.progress=False", "study.semi_kinds=['standard','semi0.5']"])
    out = capsys.readouterr().out
    assert "semi0.5" in out and "lookup/uniform" in out
    assert set(res["ppl"]) == {"standard", "semi0.5"} and set(res["tasks"]["lookup/uniform"]) == {"standard", "semi0.5"}
    assert (wd / "semi_results.json").exists() and (wd / "semi_perplexity_vs_position.png").exists()
    assert (wd / "semi.json").exists() and (wd / "semi.png").exists()
    with pytest.raises(ValueError, match="semiP"):
        lexinvariant.main(["semi", "--config", "tiny", "--workdir", str(wd), "--data", str(corpus),
                           "study.semi_kinds=['semix']"])


def test_decipher_study_trains_probe_with_frozen_lm(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat sat on mat {i % 11}\n" for i in range(4000)))
    wd = tmp_path / "run"
    res = lexinvariant.main(["decipher", "--config", "tiny", "--workdir", str(wd), "--data", str(corpus),
                             "train.steps=3", "train.progress=False"])
    assert "key precision" in capsys.readouterr().out
    assert len(res["key_precision"]) == 4 and all(0 <= p <= 1 for p in res["key_precision"])
    assert (wd / "decipher.json").exists() and (wd / "decipher.png").exists()
    assert res["probe_steps"] == 4


def test_corpora_study_overlays_byte_and_sentencepiece(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"def f{i % 13}(x):\n    return x + {i % 7}\n" for i in range(3000)))
    b.write_text("".join(f"To be or not to be, line {i % 17}.\n" for i in range(3000)))
    wd = tmp_path / "run"
    res = lexinvariant.main(["corpora", "--config", "tiny", "--workdir", str(wd), "train.progress=False",
                             f"study.corpora=['{a}', '{b}']"])
    assert "a-sentencepiece" in capsys.readouterr().out
    assert {r["corpus"] for r in res["table"]} == {"a-byte", "a-sentencepiece", "b-byte", "b-sentencepiece"}
    vocab = {r["corpus"]: r["vocab"] for r in res["table"]}
    assert vocab["a-byte"] == vocab["b-byte"] == 256 and 256 < vocab["a-sentencepiece"] <= 400
    assert len(res["curves"]) == 8 and all(len(v) == 32 for v in res["curves"].values())
    assert (wd / "corpora.png").stat().st_size > 5000 and (wd / "corpora.json").exists()


def test_all_runs_every_study_in_one_workdir(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"x{i % 9} -> y{i % 5}\n" for i in range(6000)))
    wd = tmp_path / "run"
    out = lexinvariant.main(["all", "--config", "tiny", "--workdir", str(wd), "--data", str(corpus),
                             "train.steps=2", "train.progress=False", "study.semi_kinds=['standard','semi0.2']",
                             f"study.corpora=['{corpus}']", "study.corpora_tokenizers=['byte']"])
    assert set(out) == {"position", "tasks", "semi", "decipher", "corpora"}
    for name in ("results.json", "tasks.json", "semi_results.json", "decipher.json", "corpora.json"):
        assert (wd / name).exists(), name

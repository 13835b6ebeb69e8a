import json

import numpy as np

from experiments import protein_mlm
from cli_check import assert_usage_error



def write_fasta(path, n=120, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("LAGVSERTIDPKQNFYMHWC"))
    with open(path, "w") as f:
        for i in range(n):
            f.write(f">P{i // 2}_{'AB'[i % 2]}\n{''.join(rng.choice(letters, rng.integers(5, 50)))}\n")


def test_tiny_study_writes_table_results_and_plot(tmp_path, capsys):
    fasta = tmp_path / "chains.fasta"
    write_fasta(fasta)
    wd = tmp_path / "run"
    argv = ["--config", "tiny", "--workdir", str(wd), "--data", str(fasta), "train.progress=False"]
    res = protein_mlm.main(argv)
    out = capsys.readouterr().out
    assert "esm2 mlm" in out and "unigram" in out and "accuracy" in out and str(wd) in out
    saved = json.load(open(wd / "results.json"))
    assert [r["model"] for r in saved["table"]] == ["esm2 mlm", "unigram"]
    for row in saved["table"]:
        assert np.isfinite(row["ppl"]) and row["ppl"] > 1 and 0 <= row["accuracy"] <= 1
    d = saved["derived"]
    assert d["train_chains"] + d["valid_chains"] == 120 and d["valid_chains"] > 0
    assert saved["unigram"]["ppl"] < 20.5  # smoothed frequencies of ~20 residues, near uniform
    assert (wd / "loss.png").stat().st_size > 5000
    again = protein_mlm.main(argv)  # finished: restores, does not retrain
    assert again["table"] == res["table"]


def test_cli_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text("MKTAYI\n")
    for args, msg in [(["--data", str(bad)], "before any '>' header"),
                      (["--data", str(tmp_path / "missing.fasta")], "No such file")]:
        assert_usage_error("experiments.protein_mlm", ["--config", "tiny", "--workdir", str(tmp_path / "w"), *args], msg)

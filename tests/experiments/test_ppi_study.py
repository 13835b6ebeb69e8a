import json
import os
import sys

import numpy as np
import pytest

from experiments import ppi as study
from cli_check import assert_usage_error

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
VARIANTS = "convbert:hp,convbert:pad,finetune:sc,finetune:hp"  # EC: tests/models/test_ppi.py


def test_tiny_study_trains_both_modes_writes_results_and_resumes(tmp_path, capsys):
    wd = tmp_path / "run"
    argv = ["--config", "tiny", "--workdir", str(wd), f"study.variants={VARIANTS}", "train.progress=False"]
    res = study.main(argv)
    out = capsys.readouterr().out
    assert "convbert-HP" in out and "finetune-SC" in out and "composition" in out and "0.47 ESM2-650M" in out
    saved = json.load(open(wd / "results.json"))
    setups = [r["setup"] for r in saved["table"]]
    assert setups == ["convbert-HP", "convbert-PAD", "finetune-SC", "finetune-HP", "composition"]
    d = saved["derived"]
    assert d["train_complexes"] + d["val_complexes"] + d["test_complexes"] == d["complexes"] == 160
    for name, run in saved["runs"].items():
        assert len(run["test_pred"]) == d["test_complexes"] and np.isfinite(run["test_pred"]).all(), name
        assert -1 <= run["test"]["spearman"] <= 1 and run["test"]["rmse"] > 0 and run["best_step"] in (3, 6)
    # frozen variants train only the head: the encoder's embeddings were cached once per table
    assert sorted(os.listdir(wd / "features"))[0].startswith("chain-") and len(os.listdir(wd / "features")) == 2
    assert (wd / "encoder").is_dir() and (wd / "bars.png").stat().st_size > 5000
    assert (wd / "scatter.png").stat().st_size > 5000
    again = study.main(argv)  # finished: restores, does not retrain
    assert again["table"] == res["table"]


def test_bad_variants_and_data_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("PDB,Ligand Sequences,Receptor Sequences,KD(M)\nX1,AC,DE,-1\n")
    for args, msg in [(["study.variants=frozen:hp"], "study.variants entry 'frozen:hp'"),
                      (["--data", str(bad), "data.split="], "KD=-1.0 must be > 0")]:
        assert_usage_error("experiments.ppi", ["--config", "tiny", "--workdir", str(tmp_path / "w"), *args], msg)


def test_paper_config_is_the_reference_recipe():
    from experiments.configs.ppi import get_config
    c = get_config("paper")
    assert c.optim.lr == 5e-4 and c.optim.warmup_steps == 1000 and c.optim.clip_norm == 1.0
    assert c.train.batch_size == 32 and c.layout.max_side == 2000 and c.study.seeds == 3
    assert c.train.best_metric == "spearman" and c.encoder.checkpoint == "facebook/esm2_t33_650M_UR50D"
    assert c.encoder.attention_chunk == 256 and c.data.bucket_quantum == 64  # length 2000: memory and padding
    with pytest.raises(ValueError, match="unknown config 'big'"):
        get_config("big")


@pytest.mark.requires_transformers
def test_study_runs_on_a_t5_checkpoint_with_its_own_tokenizer(tmp_path):
    """A tiny random ProtT5-style checkpoint (transformers T5EncoderModel + a sentencepiece model in ProtT5's
    format): chains end in </s> with no <cls>, and both modes train on it."""
    import sentencepiece as spm
    sys.path.insert(0, os.path.join(ROOT, "tests", "models"))
    import make_t5_fixture as fx
    from jaxemb.data import ppi as data
    from jaxemb.models import plm
    ckpt = tmp_path / "prot_t5_tiny"
    fx.tiny_t5("gated-gelu", seed=2).save_pretrained(ckpt)
    letters = "ACDEFGHIKLMNPQRSTVWYX"
    rng = np.random.default_rng(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(list(letters), 30)) for _ in range(200)]),
        model_prefix=str(ckpt / "spiece"), model_type="word", vocab_size=len(letters) + 3, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2)
    bb, _ = plm.from_checkpoint(str(ckpt))
    assert bb.kind == "t5" and bb.vocab.name == "t5-prot_t5" and bb.vocab.cls is None
    c = data.Complex("X", ("MKV", "AC"), ("WY",), 1e-9, 9.0, 2)
    lay = data.layouts([c], data.Layout(), bb.vocab)
    sc = lay["sc"][0][:lay["sc_len"][0]].tolist()
    assert len(sc) == 3 + 2 + 2 + 3 and sc.count(bb.vocab.eos) == 3 and sc[3] == bb.vocab.eos and sc[-1] == 1
    wd = tmp_path / "run"
    res = study.main(["--config", "tiny", "--workdir", str(wd), "--checkpoint", str(ckpt),
                      "study.variants=convbert:pad,finetune:hp", "train.progress=False"])
    assert res["derived"]["backbone"] == "t5" and [r["setup"] for r in res["table"]][:2] == ["convbert-PAD",
                                                                                          "finetune-HP"]
    assert all(np.isfinite(r["test_pred"]).all() for r in res["runs"].values())

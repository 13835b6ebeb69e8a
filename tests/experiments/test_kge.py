import json
import os

import jax
import numpy as np
import pytest

from experiments import kge
from experiments.configs.kge import DATA_ROOT, get_config
from jaxemb.data import kg
from jaxemb.train.metrics import read_metrics
from cli_check import assert_usage_error

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MESHES = {"one": (dict(data=1, fsdp=1, tensor=1), 1), "entities8": (dict(data=1, fsdp=1, tensor=8), 8),
          "mixed8": (dict(data=2, fsdp=2, tensor=2), 8)}


@pytest.fixture(scope="module")
def umls():
    g = kg.load("umls", DATA_ROOT)
    return g, kg.Filter(g)


def _cfg(mesh, model="nfe1"):
    cfg = get_config("tiny")
    cfg.mesh.shape, cfg.mesh.num_devices = MESHES[mesh]
    cfg.study.epochs = 1
    return kge.model_config(cfg, model, [])


def test_sharded_training_and_metrics_equal_unsharded(umls, tmp_path):
    g, filt = umls
    out = {}
    for mesh in ("one", "mixed8"):  # (the entities-only mesh is covered by the ranking test)
        c = _cfg(mesh)
        c.train.batch_size = 256
        res = kge.train_model(c, g, filt, str(tmp_path / mesh))
        losses = [r["loss"] for r in read_metrics(str(tmp_path / mesh / "nfe1" / "metrics.jsonl"), "train")]
        out[mesh] = (losses, res["test"])
    for mesh in ("mixed8",):
        np.testing.assert_allclose(out[mesh][0], out["one"][0], rtol=1e-4)  # all-reduce order: ~1 ulp per step
        for k, v in out["one"][1].items():
            np.testing.assert_allclose(out[mesh][1][k], v, rtol=1e-3, err_msg=f"{mesh} {k}")


@pytest.mark.parametrize("model", ["nfe2", "complex"])
def test_ranking_same_params_sharded_unsharded_and_numpy(umls, tmp_path, model):
    """The same random parameters ranked on 1 and 8 devices give identical ranks, equal to a float64 numpy
    ranking away from near-ties."""
    g, filt = umls
    queries = kg.reciprocal(g.valid, g.num_relations)[:200]
    params, ranks = None, {}
    meshes = ("one", "entities8", "mixed8") if model == "nfe2" else ("one", "mixed8")
    for mesh in meshes:
        c = _cfg(mesh, model)
        c.model.init_scale = 0.5
        task, trainer, _ = kge.setup(c, g, str(tmp_path / mesh))
        src = kg.QuerySource(queries, filt, 64)
        state = trainer.init_state(trainer.put_batch(src, 0))
        if params is None:
            params = jax.device_get(state["params"])
        placed = jax.device_put(params, trainer.state_shardings["params"])
        if mesh == "entities8":
            for part in placed["entity"]:
                assert len(part.sharding.device_set) == 8
                assert part.sharding.shard_shape(part.shape)[0] == part.shape[0] // 8
        ranks[mesh] = kge.rank_queries(trainer, task, placed, src)
    for mesh in meshes[1:]:
        np.testing.assert_array_equal(ranks[mesh], ranks["one"])
    # numpy float64
    import importlib.util
    spec = importlib.util.spec_from_file_location("nfe_direct", os.path.join(ROOT, "tests", "models", "test_nfe.py"))
    direct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(direct)
    ent, rel = direct.flat(params["entity"])[:g.num_entities], direct.flat(params["relation"])
    checked = 0
    for i, (h, r, t) in enumerate(queries):
        s = np.array([direct.direct(model, ent[h], rel[r], ent[e], c.model.gamma) for e in range(g.num_entities)])
        others = [e for e in filt.known(h, r) if e != t]
        keep = np.ones(g.num_entities, bool)
        keep[others] = False
        keep[t] = False
        gaps = np.abs(s[keep] - s[t])
        if gaps.size and gaps.min() < 1e-4:
            continue  # a near-tie: float32 may order it either way
        assert ranks["one"][i] == 1 + np.sum(s[keep] > s[t]), i
        checked += 1
    assert checked > 160


def test_study_table_results_plot_and_resume(tmp_path, capsys):
    wd = tmp_path / "run"
    argv = ["--config", "tiny", "--workdir", str(wd), "study.models=['nfe1','complex']",
            "train.batch_size=256", "study.epochs=1"]
    res = kge.main(argv)
    out = capsys.readouterr().out
    for word in ("valid MRR", "H@10", "nfe1", "complex", "umls"):
        assert word in out
    saved = json.load(open(wd / "results.json"))
    assert set(saved["models"]) == {"nfe1", "complex"} and saved["ties"] == "mean"
    for r in saved["models"].values():
        t = r["test"]
        assert 0 < t["mrr"] <= 1 and 1 <= t["mr"] <= 135 and t["hits@1"] <= t["hits@3"] <= t["hits@10"]
        assert len(r["curve"]) == 1 and r["steps_per_epoch"] == 41  # ceil(2 * 5216 / 256)
    assert (wd / "learning_curves.png").stat().st_size > 5000
    again = kge.main(argv)  # finished runs resume without training; the best state gives the same numbers
    assert again["models"]["nfe1"]["test"] == res["models"]["nfe1"]["test"]


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.txt").write_text("a\tr\tb\nbroken line here too\n")
    (bad / "valid.txt").write_text("a\tr\tb\n")
    (bad / "test.txt").write_text("a\tr\tb\n")
    for args, msg in [(["--dataset", str(bad)], "train.txt:2: expected head<TAB>relation<TAB>tail"),
                      (["--dataset", "nowhere"], "dataset 'nowhere'"),
                      (["--model", "rotate"], "model.name='rotate'")]:
        assert_usage_error("experiments.kge", ["--config", "tiny", "--workdir", str(tmp_path / "w"), *args], msg,
                           one_line=False)


def test_step_counts_come_from_epochs_and_bad_epochs_are_refused_up_front(tmp_path):
    c = _cfg("one")
    assert kge.epoch_steps(c, kg.TrainSource(np.zeros((130, 3), np.int32), 64)) == \
        {"train.steps": 3, "train.eval_every": 3, "optim.decay_steps": 3}  # 1 epoch of ceil(130 / 64) steps
    assert c.train.steps == 0  # derived counts go to the trainer's copy, not into the study's config
    for override, msg in [("train.steps=5", "train.steps=5: the KGE study trains whole epochs"),
                          ("train.eval_every=2", "train.eval_every=2: the KGE study"),
                          ("study.epochs=0", "study.epochs=0: expected a whole number of epochs >= 1"),
                          ("study.eval_every_epochs=-1", "study.eval_every_epochs=-1")]:
        with pytest.raises(ValueError, match=msg):
            kge.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), override, "--dataset", "nowhere"])


def test_paper_configs():
    c = get_config("paper-wn18rr-nfe1")
    assert (c.model.dim, c.study.epochs, c.model.gamma, c.train.batch_size, c.optim.lr, c.optim.decay_rate) == \
        (1024, 50, 1.0, 128, 0.005, 0.9)
    c = get_config("paper", "FB15k-237", "nfe2")
    assert (c.data.source, c.model.name, c.model.gamma, c.train.batch_size, c.optim.lr) == \
        ("FB15k-237", "nfe2", 1.0, 256, 0.001)
    assert get_config("paper-yago3-10-nfe1").study.epochs == 150
    assert get_config("paper-wn18rr-nfe3").model.gamma == 14.0
    assert c.optim.name == "adam" and c.optim.schedule == "exponential" and c.model.init_scale == 0.1
    with pytest.raises(ValueError, match="no paper config for dataset 'WN18RR' and model 'complex'"):
        get_config("paper", "WN18RR", "complex")
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        get_config("huge")

"""Configs for `python -m experiments.kge`.

  default                 UMLS, all models at dimension 64, minutes on a CPU
  tiny                    for tests: a few epochs at dimension 8
  paper                   the reference code's settings for --dataset and --model (default WN18RR nfe1)
  paper-<dataset>-<model> the same by name, e.g. paper-wn18rr-nfe1, paper-fb15k-237-nfe2, paper-yago3-10-nfe1
  cpu-wn18rr              NFE-1 on WN18RR at dimension 64, softmax loss, 10 epochs: a CPU-feasible quality run
"""
from __future__ import annotations

import os

import ml_collections

from jaxemb.train import core_config

DATA_ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "kg"))
ALL_MODELS = ["nfe1", "nfe2", "nfe3", "nfe_mu", "nfe_sigma", "transe", "distmult", "complex"]

# (dataset, model) -> (dimension, epochs, gamma, batch, lr, decay), from the reference code's
# "Hyper-parameters Settings.txt" (github.com/changyi7231/NFE). nfe_mu = "NFE-w/o-uncertainty",
# transe = "NFE-1-mu", nfe_sigma = "NFE-1-sigma". Seed 0, Adam, per-epoch exponential decay.
PAPER = {
    ("WN18RR", "nfe1"): (1024, 50, 1.0, 128, 0.005, 0.9),
    ("WN18RR", "nfe2"): (1024, 50, 0.0, 128, 0.003, 0.93),
    ("WN18RR", "nfe3"): (1024, 50, 14.0, 512, 0.01, 0.93),
    ("WN18RR", "nfe_mu"): (1024, 50, 0.0, 128, 0.005, 0.93),
    ("WN18RR", "transe"): (512, 50, 2.0, 256, 0.01, 0.9),
    ("WN18RR", "nfe_sigma"): (1024, 50, 4.0, 128, 0.01, 0.93),
    ("WN18RR", "distmult"): (512, 50, 0.0, 128, 0.003, 1.0),
    ("FB15k-237", "nfe1"): (1024, 50, 2.0, 1024, 0.001, 0.93),
    ("FB15k-237", "nfe2"): (1024, 50, 1.0, 256, 0.001, 0.9),
    ("FB15k-237", "nfe3"): (1024, 50, 2.0, 256, 0.001, 0.9),
    ("FB15k-237", "nfe_mu"): (1024, 50, 0.0, 128, 0.0005, 0.95),
    ("FB15k-237", "transe"): (512, 50, 3.0, 1024, 0.003, 0.9),
    ("FB15k-237", "nfe_sigma"): (1024, 50, 0.0, 128, 0.001, 0.93),
    ("FB15k-237", "distmult"): (512, 50, 0.0, 128, 0.01, 0.9),
    ("YAGO3-10", "nfe1"): (1024, 150, 8.0, 1024, 0.001, 0.95),
    ("YAGO3-10", "nfe2"): (1024, 100, 7.0, 1024, 0.001, 0.95),
    ("YAGO3-10", "nfe3"): (1024, 100, 11.0, 1024, 0.001, 0.93),
    ("YAGO3-10", "nfe_mu"): (1024, 50, 8.0, 1024, 0.003, 0.9),
    ("YAGO3-10", "transe"): (512, 50, 9.0, 1024, 0.005, 0.9),
    ("YAGO3-10", "nfe_sigma"): (1024, 50, 19.0, 1024, 0.001, 0.95),
    ("YAGO3-10", "distmult"): (512, 50, 0.0, 1024, 0.001, 0.95),
}

# default study (UMLS, dimension 64): per-model settings, chosen by a short manual search on valid MRR
DEFAULT_MODELS = {
    "nfe1": dict(gamma=1.0, lr=0.01),
    "nfe2": dict(gamma=1.0, lr=0.01),
    "nfe3": dict(gamma=6.0, lr=0.01),
    "nfe_mu": dict(gamma=1.0, lr=0.01),
    "nfe_sigma": dict(gamma=1.0, lr=0.01),
    "transe": dict(gamma=2.0, lr=0.01),
    "distmult": dict(gamma=0.0, lr=0.01),
    "complex": dict(gamma=0.0, lr=0.01, loss="softmax", n3=0.005),
}


def _base() -> ml_collections.ConfigDict:
    c = core_config()
    c.data = dict(source="umls", root=DATA_ROOT, unseen="keep")
    c.model = dict(name="nfe1", dim=64, gamma=1.0, init_scale=0.1, loss="logistic", n3=0.0, ties="mean")
    c.study = dict(models=list(ALL_MODELS), epochs=30, eval_every_epochs=1, eval_batch_size=256,
                   per_model={k: dict(v) for k, v in DEFAULT_MODELS.items()})
    c.mesh.shape = dict(data=1, fsdp=1, tensor=-1)  # entity tables sharded over every device
    c.train.update(steps=0, batch_size=256, log_every=20, eval_every=0, checkpoint_every=0, keep_checkpoints=1,
                   best_metric="mrr", best_mode="max")
    c.optim.update(name="adam", lr=0.01, schedule="exponential", decay_rate=0.95, decay_steps=0, warmup_steps=0,
                   b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0)
    return c


def paper_config(dataset: str, model: str) -> ml_collections.ConfigDict:
    key = next((k for k in PAPER if k[0].lower() == dataset.lower() and k[1] == model), None)
    if key is None:
        raise ValueError(f"no paper config for dataset {dataset!r} and model {model!r}; known: "
                         f"{', '.join(f'{d}/{m}' for d, m in PAPER)}")
    dim, epochs, gamma, batch, lr, decay = PAPER[key]
    c = _base()
    c.data.source = key[0]
    c.model.update(name=model, dim=dim, gamma=gamma)
    c.study.update(models=[model], epochs=epochs, eval_batch_size=512, per_model={})
    c.train.update(batch_size=batch, log_every=100)
    c.optim.update(lr=lr, decay_rate=decay)
    return c


def get_config(name: str = "default", dataset: str | None = None, model: str | None = None):
    """`dataset` (name or path) and `model` narrow the study to one model on one dataset."""
    if name == "default":
        c = _base()
    elif name == "tiny":
        c = _base()
        c.model.dim = 8
        c.study.update(epochs=2, eval_batch_size=64)
        c.train.update(batch_size=64, log_every=5, progress=False)
    elif name == "paper":
        c = paper_config(dataset or "WN18RR", model or "nfe1")
    elif name.startswith("paper-"):
        ds, _, m = name[len("paper-"):].rpartition("-")
        c = paper_config(ds, m)
    elif name == "cpu-wn18rr":  # ~105 s per epoch on a 2-core CPU
        # Softmax cross-entropy instead of the reference's summed logistic loss: at this size and length
        # the logistic loss stays at valid MRR ~0.02 for the first 3 epochs, softmax reaches 0.19 in one.
        c = paper_config("WN18RR", "nfe1")
        c.model.update(dim=64, loss="softmax")
        c.study.epochs = 10
    else:
        raise ValueError(f"unknown config {name!r}; expected default, tiny, paper, paper-<dataset>-<model> "
                         "or cpu-wn18rr")
    if dataset:
        c.data.source = dataset
    if model:
        c.study.models = [model]
        c.model.name = model
    return c

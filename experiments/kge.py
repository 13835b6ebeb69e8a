"""Knowledge-graph embedding study: NFE-1/2/3, ablations and baselines under filtered ranking (Xiao et al. 2023).

    python -m experiments.kge                                   # default: UMLS, all models, minutes on a CPU
    python -m experiments.kge --dataset WN18RR --model nfe1     # one model; a dataset name or directory
    python -m experiments.kge --config paper --dataset FB15k-237 --model nfe2   # the reference code's settings
    python -m experiments.kge model.dim=128 study.epochs=50     # any config key

Each model trains through the shared core (1-vs-all over reciprocal triples, Adam with per-epoch exponential
decay), is validated every epoch by filtered MRR (best state kept in WORKDIR/<model>/best), and the best state
is ranked on test queries in both directions. Prints the side-by-side table and writes results.json and
learning_curves.png into WORKDIR.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from experiments import harness
from experiments.configs.kge import get_config
from jaxemb.config import apply_overrides
from jaxemb.data import kg
from jaxemb.models.nfe import KGETask, parameter_count
from jaxemb.train import Trainer
from jaxemb.train.metrics import read_metrics

_ROUTES = {"lr": "optim", "decay_rate": "optim", "batch_size": "train"}  # per-model keys outside cfg.model
_DERIVED = ("train.steps", "train.eval_every", "optim.decay_steps")  # set from the epochs, see epoch_steps


def ranking_metrics(ranks: np.ndarray) -> dict:
    """Filtered ranks (n,) -> MRR, MR, Hits@1/3/10."""
    r = np.asarray(ranks, np.float64)
    return {"mrr": float(np.mean(1.0 / r)), "mr": float(np.mean(r)),
            **{f"hits@{k}": float(np.mean(r <= k)) for k in (1, 3, 10)}}


def rank_queries(trainer, task, params, source: kg.QuerySource) -> np.ndarray:
    """Filtered rank of every query of `source` (sharded scoring on the trainer's mesh)."""
    outs = trainer.map_batches(task.rank_step, params, source, source.num_batches)
    return np.concatenate(outs)[:source.num_rows]


def evaluate(trainer, task, params, source: kg.QuerySource) -> dict:
    """Metrics over all queries, plus tail (original direction) and head (reciprocal) halves."""
    ranks = rank_queries(trainer, task, params, source)
    half = len(ranks) // 2
    return dict(ranking_metrics(ranks), tail_mrr=ranking_metrics(ranks[:half])["mrr"],
                head_mrr=ranking_metrics(ranks[half:])["mrr"])


def model_config(cfg, name: str, overrides: list):
    """cfg for one model: the study's per-model settings, then the command-line overrides again (they win).
    The study trains whole epochs: study.epochs and study.eval_every_epochs must be >= 1, and the step
    counts derived from them (train.steps, train.eval_every, optim.decay_steps) must be left at 0."""
    c = harness.with_settings(cfg, **{"model.name": name})
    for key, value in c.study.per_model.get(name, {}).items():
        section = c[_ROUTES.get(key, "model")]
        if key not in section:
            raise KeyError(f"study.per_model.{name}.{key}: unknown key")
        with section.ignore_type():
            section[key] = value
    apply_overrides(c, overrides)
    for key in ("epochs", "eval_every_epochs"):
        if not c.study[key] >= 1:
            raise ValueError(f"study.{key}={c.study[key]!r}: expected a whole number of epochs >= 1")
    for key in _DERIVED:
        section, leaf = key.split(".")
        if c[section][leaf]:
            raise ValueError(f"{key}={c[section][leaf]!r}: the KGE study trains whole epochs and derives {key} "
                             "from the steps per epoch; set study.epochs (and study.eval_every_epochs) instead")
    return c


def epoch_steps(c, train: kg.TrainSource) -> dict:
    """The trainer's step counts for one model: its epochs x the steps (batches) per epoch."""
    spe = train.num_batches
    return {"train.steps": c.study.epochs * spe, "train.eval_every": c.study.eval_every_epochs * spe,
            "optim.decay_steps": spe}  # lr * decay_rate once per epoch


def setup(c, graph: kg.KG, workdir: str):
    """(task, trainer in workdir, train source) for one model, the trainer's config with epoch_steps."""
    train = kg.TrainSource(kg.reciprocal(graph.train, graph.num_relations), c.train.batch_size, c.seed)
    task = KGETask(c.model, graph.num_entities, graph.num_relations)
    return task, Trainer(task, harness.with_settings(c, **epoch_steps(c, train)), workdir), train


def train_model(c, graph: kg.KG, filt: kg.Filter, workdir: str) -> dict:
    """Trains model c.model.name in workdir/<name>, keeps its best valid state, ranks the test queries."""
    train = kg.TrainSource(kg.reciprocal(graph.train, graph.num_relations), c.train.batch_size, c.seed)
    derived, spe = epoch_steps(c, train), train.num_batches
    task = KGETask(c.model, graph.num_entities, graph.num_relations)
    valid, test = (kg.QuerySource(kg.reciprocal(graph.split(s), graph.num_relations), filt, c.study.eval_batch_size)
                   for s in ("valid", "test"))
    v = harness.train_variant(c.model.name, task, harness.with_settings(c, **derived), workdir, train,
                              eval_fn=lambda trainer, st: evaluate(trainer, task, st["params"], valid))
    best, meta = v.trainer.restore_best(v.result.state)
    started = time.perf_counter()
    result = evaluate(v.trainer, task, best["params"], test)
    seconds = v.result.train_seconds
    metrics = os.path.join(v.trainer.workdir, "metrics.jsonl")
    curve = [{"epoch": r["step"] / spe, "mrr": r["mrr"]} for r in read_metrics(metrics, "eval")]
    loss = [{"epoch": r["step"] / spe, "loss": r["loss"]} for r in read_metrics(metrics, "train")]
    return {"test": result, "valid_mrr": meta["value"], "best_epoch": meta["step"] / spe,
            "train_seconds": seconds, "epoch_seconds": seconds / max(c.study.epochs, 1),
            "test_seconds": time.perf_counter() - started, "parameters": parameter_count(best["params"]),
            "steps_per_epoch": spe, "curve": curve, "loss_curve": loss, "derived": derived, "config": c.model.to_dict()
            | {"lr": c.optim.lr, "decay_rate": c.optim.decay_rate, "batch_size": c.train.batch_size}}


def print_table(dataset: str, models: dict, ties: str) -> None:
    rows = [{"model": name, "valid MRR": r["valid_mrr"], "MRR": r["test"]["mrr"], "MR": r["test"]["mr"],
             "H@1": r["test"]["hits@1"], "H@3": r["test"]["hits@3"], "H@10": r["test"]["hits@10"],
             "best ep": r["best_epoch"], "train s": r["train_seconds"]} for name, r in models.items()]
    harness.print_table(rows, f"{dataset}: filtered test metrics (both directions; ties count half), best valid "
                        "epoch", width=9, formats={"MR": ".1f", "best ep": ".0f", "train s": ".1f"})
    if ties != "mean":
        print(f"(ties: {ties})")


OPTIONS = {"--dataset": (None, "dataset name (umls, WN18RR, ...) or directory of train/valid/test.txt"),
           "--model": (None, "train only this model (e.g. nfe1)")}


def _default_workdir(args) -> str:
    return os.path.join("runs/kge", os.path.basename(os.path.normpath(args.dataset))) if args.dataset else "runs/kge"


def main(argv=None) -> dict:
    args, cfg = harness.parse(sys.argv[1:] if argv is None else argv, __doc__.splitlines()[0], get_config,
                              _default_workdir, data=False, options=OPTIONS)
    configs = {name: model_config(cfg, name, args.overrides) for name in cfg.study.models}  # all checked first
    graph = kg.load(cfg.data.source, cfg.data.root, cfg.data.unseen)
    filt = kg.Filter(graph)
    print(f"{graph.name}: {graph.num_entities} entities, {graph.num_relations // 2} relations, "
          f"{len(graph.train)}/{len(graph.valid)}/{len(graph.test)} triples; valid/test triples with an entity or "
          f"relation unseen in train ({cfg.data.unseen}): {graph.unseen}", flush=True)
    models = {name: train_model(c, graph, filt, args.workdir) for name, c in configs.items()}
    print_table(graph.name, models, cfg.model.ties)
    results = harness.write_results(args.workdir, "results.json", {
        "dataset": graph.name, "entities": graph.num_entities, "relations": graph.num_relations // 2,
        "triples": {s: len(graph.split(s)) for s in kg.SPLITS}, "unseen": graph.unseen,
        "unseen_policy": cfg.data.unseen, "ties": cfg.model.ties, "epochs": cfg.study.epochs, "models": models}, cfg)
    harness.plot(os.path.join(args.workdir, "learning_curves.png"), [
        dict(lines=[dict(x=[p["epoch"] for p in r["curve"]], y=[p["mrr"] for p in r["curve"]], marker=".", label=n)
                    for n, r in models.items()], xlabel="epoch", ylabel="filtered MRR (valid)", legend_size=8,
             title=f"{graph.name}, dimension {cfg.model.dim}"),
        dict(lines=[dict(x=[p["epoch"] for p in r["loss_curve"]], y=[p["loss"] for p in r["loss_curve"]])
                    for r in models.values()], xlabel="epoch", ylabel="training loss", yscale="log",
             title="training loss")], figsize=(11, 4.2))
    print(f"\nresults: {os.path.abspath(args.workdir)}  (results.json, learning_curves.png)")
    return results


if __name__ == "__main__":
    harness.run_cli(main)

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

import argparse
import copy
import os
import time

import numpy as np

from experiments.common import machine, parse_study_args, run_cli, save_figure, write_json
from experiments.configs.kge import get_config
from jaxemb.config import apply_overrides
from jaxemb.data import kg
from jaxemb.models.nfe import KGETask, parameter_count
from jaxemb.train import Trainer
from jaxemb.train.metrics import read_metrics

_ROUTES = {"lr": "optim", "decay_rate": "optim", "batch_size": "train"}  # per-model keys outside cfg.model


def ranking_metrics(ranks: np.ndarray) -> dict:
    """Filtered ranks (n,) -> MRR, MR, Hits@1/3/10."""
    r = np.asarray(ranks, np.float64)
    return {"mrr": float(np.mean(1.0 / r)), "mr": float(np.mean(r)),
            **{f"hits@{k}": float(np.mean(r <= k)) for k in (1, 3, 10)}}


def rank_queries(trainer, task, params, source: kg.QuerySource) -> np.ndarray:
    """Filtered rank of every query of `source` (sharded scoring on the trainer's mesh)."""
    outs = trainer.map_batches(task.rank_step, params, source, source.num_batches)
    return np.concatenate(outs)[:len(source.queries)]


def evaluate(trainer, task, params, source: kg.QuerySource) -> dict:
    """Metrics over all queries, plus tail (original direction) and head (reciprocal) halves."""
    ranks = rank_queries(trainer, task, params, source)
    half = len(ranks) // 2
    return dict(ranking_metrics(ranks), tail_mrr=ranking_metrics(ranks[:half])["mrr"],
                head_mrr=ranking_metrics(ranks[half:])["mrr"])


def model_config(cfg, name: str, overrides: list):
    """cfg for one model: the study's per-model settings, then the command-line overrides again (they win)."""
    c = copy.deepcopy(cfg)
    c.model.name = name
    for key, value in c.study.per_model.get(name, {}).items():
        section = c[_ROUTES.get(key, "model")]
        if key not in section:
            raise KeyError(f"study.per_model.{name}.{key}: unknown key")
        with section.ignore_type():
            section[key] = value
    apply_overrides(c, overrides)
    return c


def setup(c, graph: kg.KG, workdir: str):
    """(task, trainer, train source) for one model; sets the epoch-based step counts in `c`."""
    train = kg.TrainSource(kg.reciprocal(graph.train, graph.num_relations), c.train.batch_size, c.seed)
    spe = train.steps_per_epoch
    c.train.steps = c.study.epochs * spe
    c.train.eval_every = c.study.eval_every_epochs * spe
    c.optim.decay_steps = spe  # lr * decay_rate once per epoch
    task = KGETask(c.model, graph.num_entities, graph.num_relations)
    return task, Trainer(task, c, workdir), train


def train_model(c, graph: kg.KG, filt: kg.Filter, workdir: str) -> dict:
    task, trainer, train = setup(c, graph, workdir)
    spe = train.steps_per_epoch
    qs = c.study.eval_batch_size
    valid = kg.QuerySource(kg.reciprocal(graph.valid, graph.num_relations), filt, qs)
    test = kg.QuerySource(kg.reciprocal(graph.test, graph.num_relations), filt, qs)
    state = trainer.fit(train, eval_fn=lambda st: evaluate(trainer, task, st["params"], valid), desc=c.model.name)
    best, meta = trainer.restore_best(state)
    started = time.perf_counter()
    result = evaluate(trainer, task, best["params"], test)
    seconds = getattr(trainer, "train_seconds", 0.0)
    curve = [{"epoch": r["step"] / spe, "mrr": r["mrr"]} for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "eval")]
    loss = [{"epoch": r["step"] / spe, "loss": r["loss"]} for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")]
    return {"test": result, "valid_mrr": meta["value"], "best_epoch": meta["step"] / spe,
            "train_seconds": seconds, "epoch_seconds": seconds / max(c.study.epochs, 1),
            "test_seconds": time.perf_counter() - started, "parameters": parameter_count(best["params"]),
            "steps_per_epoch": spe, "curve": curve, "loss_curve": loss, "config": c.model.to_dict()
            | {"lr": c.optim.lr, "decay_rate": c.optim.decay_rate, "batch_size": c.train.batch_size}}


def print_table(dataset: str, models: dict, ties: str) -> None:
    cols = ["valid MRR", "MRR", "MR", "H@1", "H@3", "H@10", "best ep", "train s"]
    print(f"\n{dataset}: filtered test metrics (both directions; ties count half), best valid epoch")
    print(f"{'model':>10}  " + "  ".join(f"{c:>9}" for c in cols))
    for name, r in models.items():
        t = r["test"]
        vals = [r["valid_mrr"], t["mrr"], t["mr"], t["hits@1"], t["hits@3"], t["hits@10"]]
        print(f"{name:>10}  " + "  ".join(f"{v:>9.3f}" if i != 2 else f"{v:>9.1f}" for i, v in enumerate(vals))
              + f"  {r['best_epoch']:>9.0f}  {r['train_seconds']:>9.1f}")
    if ties != "mean":
        print(f"(ties: {ties})")


def plot(models: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in models.items():
        ax1.plot([p["epoch"] for p in r["curve"]], [p["mrr"] for p in r["curve"]], marker=".", label=name)
        ax2.plot([p["epoch"] for p in r["loss_curve"]], [p["loss"] for p in r["loss_curve"]], label=name)
    ax1.set(xlabel="epoch", ylabel="filtered MRR (valid)", title=title)
    ax2.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def parse(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default=None)
    pre.add_argument("--model", default=None)
    known, rest = pre.parse_known_args(argv)
    default_workdir = "runs/kge" if not known.dataset else os.path.join(
        "runs/kge", os.path.basename(os.path.normpath(known.dataset)))
    desc = __doc__.splitlines()[0] + " Also --dataset NAME_OR_DIR and --model NAME."
    args, cfg = parse_study_args(desc, lambda name: get_config(name, known.dataset, known.model), default_workdir,
                                 rest)
    return args, cfg


def main(argv=None) -> dict:
    args, cfg = parse(argv)
    graph = kg.load(cfg.data.source, cfg.data.root, cfg.data.unseen)
    filt = kg.Filter(graph)
    print(f"{graph.name}: {graph.num_entities} entities, {graph.num_relations // 2} relations, "
          f"{len(graph.train)}/{len(graph.valid)}/{len(graph.test)} triples; valid/test triples with an entity or "
          f"relation unseen in train ({cfg.data.unseen}): {graph.unseen}", flush=True)
    models = {}
    for name in cfg.study.models:
        c = model_config(cfg, name, args.overrides)
        models[name] = train_model(c, graph, filt, os.path.join(args.workdir, name))
    print_table(graph.name, models, cfg.model.ties)
    results = {"dataset": graph.name, "entities": graph.num_entities, "relations": graph.num_relations // 2,
               "triples": {s: len(graph.split(s)) for s in kg.SPLITS}, "unseen": graph.unseen,
               "unseen_policy": cfg.data.unseen, "ties": cfg.model.ties, "epochs": cfg.study.epochs,
               "models": models, "machine": machine(), "config": cfg.to_dict()}
    write_json(os.path.join(args.workdir, "results.json"), results)
    plot(models, os.path.join(args.workdir, "learning_curves.png"), f"{graph.name}, dimension {cfg.model.dim}")
    print(f"\nresults: {os.path.abspath(args.workdir)}  (results.json, learning_curves.png)")
    return results


if __name__ == "__main__":
    run_cli(main)

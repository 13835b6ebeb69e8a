"""Zero-shot synthetic in-context tasks (LookUp, Permutation; uniform and frequency-weighted symbols) on
standard and lexinvariant LMs trained on the same corpus: `python -m experiments.lexinvariant tasks`."""
from __future__ import annotations

import os

import numpy as np

from experiments.common import save_figure, write_json
from jaxemb.data import synthetic

TASK_ARGS = {"lookup": dict(num_pairs=4), "permutation": dict(width=3, picks=2, num_examples=2)}


class ExampleSource:
    """Encoded examples as fixed batches (the last partial batch is padded with copies of row 0 and
    masked out)."""

    def __init__(self, batch: dict, batch_size: int):
        n = len(batch["inputs"])
        self.batch_size, self.num_batches = batch_size, -(-n // batch_size)
        pad = self.num_batches * batch_size - n
        self.batch = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in batch.items()}
        self.batch["weights"][n:] = 0.0

    def get(self, index, rows=slice(None)):
        return {k: v[index * self.batch_size:(index + 1) * self.batch_size][rows] for k, v in self.batch.items()}


def answer_accuracy(task, trainer, params, source: ExampleSource) -> float:
    """Teacher-forced token accuracy on the answer tokens (argmax of the model's next-token scores)."""
    import jax.numpy as jnp

    def correct(p, batch, rng):
        logits, _ = task.apply(p, batch, rng)
        hit = (jnp.argmax(logits, -1) == batch["targets"]) * batch["weights"]
        return jnp.stack([hit.sum(), batch["weights"].sum()])

    sums = np.sum(trainer.map_batches(correct, params, source, source.num_batches), axis=0)
    return float(sums[0] / max(sums[1], 1.0))


def run(cfg, models: dict, tokenizer, corpus_text: str, workdir: str, name: str = "tasks") -> dict:
    """models: kind -> (task, trainer, state). Returns {task/weighting: {kind: accuracy}}."""
    weights = {"uniform": None, "frequency": synthetic.frequency_weights(corpus_text)}
    table = {}
    for task_name, kwargs in TASK_ARGS.items():
        for wname, w in weights.items():
            examples = synthetic.make_examples(task_name, cfg.study.task_examples, seed=cfg.seed + 17, weights=w,
                                               **kwargs)
            batch = synthetic.encode_examples(examples, tokenizer)
            row = {}
            for kind, (task, trainer, state) in models.items():
                row[kind] = answer_accuracy(task, trainer, state["params"], ExampleSource(batch, cfg.train.batch_size))
            table[f"{task_name}/{wname}"] = row
    kinds = list(models)
    print(f"\nzero-shot answer-token accuracy (%), {cfg.study.task_examples} examples per cell")
    print(f"{'task':>24}" + "".join(f"{k:>14}" for k in kinds))
    for cell, row in table.items():
        print(f"{cell:>24}" + "".join(f"{100 * row[k]:>14.1f}" for k in kinds))
    write_json(os.path.join(workdir, f"{name}.json"), {"accuracy": table, "examples": cfg.study.task_examples,
                                                       "task_args": TASK_ARGS})
    _plot(table, kinds, os.path.join(workdir, f"{name}.png"))
    return table


def _plot(table, kinds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = list(table)
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, k in enumerate(kinds):
        ax.bar(x + (i - (len(kinds) - 1) / 2) * 0.8 / len(kinds), [100 * table[c][k] for c in cells],
               0.8 / len(kinds), label=k)
    ax.set_xticks(x, cells, rotation=15)
    ax.set_ylabel("answer-token accuracy (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)

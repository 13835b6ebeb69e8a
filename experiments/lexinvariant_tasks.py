"""Zero-shot synthetic in-context tasks (LookUp, Permutation; uniform and frequency-weighted symbols) on
standard and lexinvariant LMs trained on the same corpus: `python -m experiments.lexinvariant tasks`."""
from __future__ import annotations

import os

import numpy as np

from experiments import harness
from jaxemb.data import synthetic
from jaxemb.data.sources import ArraySource

TASK_ARGS = {"lookup": dict(num_pairs=4), "permutation": dict(width=3, picks=2, num_examples=2)}


def answer_accuracy(variant, source) -> float:
    """Teacher-forced token accuracy on the answer tokens (argmax of the model's next-token scores)."""
    import jax.numpy as jnp

    def correct(p, batch, rng):
        logits, _ = variant.task.apply(p, batch, rng)
        hit = (jnp.argmax(logits, -1) == batch["targets"]) * batch["weights"]
        return jnp.stack([hit.sum(), batch["weights"].sum()])

    sums = np.sum(variant.trainer.map_batches(correct, variant.params, source, source.num_batches), axis=0)
    return float(sums[0] / max(sums[1], 1.0))


def run(cfg, models: dict, tokenizer, corpus_text: str, workdir: str, name: str = "tasks") -> dict:
    """models: kind -> harness.Variant. Returns {task/weighting: {kind: accuracy}}."""
    weights = {"uniform": None, "frequency": synthetic.frequency_weights(corpus_text)}
    table = {}
    for task_name, kwargs in TASK_ARGS.items():
        for wname, w in weights.items():
            examples = synthetic.make_examples(task_name, cfg.study.task_examples, seed=cfg.seed + 17, weights=w,
                                               **kwargs)
            batch = synthetic.encode_examples(examples, tokenizer)
            table[f"{task_name}/{wname}"] = {kind: answer_accuracy(v, ArraySource(batch, cfg.train.batch_size))
                                             for kind, v in models.items()}
    kinds = list(models)
    harness.print_table([{"task": cell, **{k: 100 * row[k] for k in kinds}} for cell, row in table.items()],
                        f"zero-shot answer-token accuracy (%), {cfg.study.task_examples} examples per cell",
                        width=22, fmt=".1f")
    harness.write_results(workdir, f"{name}.json", {"accuracy": table, "examples": cfg.study.task_examples,
                                                    "task_args": TASK_ARGS}, cfg)
    x, width = np.arange(len(table)), 0.8 / len(kinds)
    bars = [dict(x=x + (i - (len(kinds) - 1) / 2) * width, height=[100 * r[k] for r in table.values()], width=width,
                 label=k) for i, k in enumerate(kinds)]
    harness.plot(os.path.join(workdir, f"{name}.png"), [dict(bars=bars, xticks=(x, list(table)),
                                                           ylabel="answer-token accuracy (%)")], figsize=(7, 3.8))
    return table

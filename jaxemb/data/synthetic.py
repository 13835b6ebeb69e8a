"""Synthetic in-context reasoning tasks of the lexinvariant paper (Huang et al. 2023, Table 1).

LookUp:       "A->2 C->4 G->5 C->"     answer "4"    (the value paired with the queried key)
Permutation:  "A 2 C->C A 4 1 D->"     answer "D 4"  (the same selection of input positions, here
                                                      (3rd, 1st), applied to a new input)
Symbols are drawn uniformly from an alphabet or weighted by a frequency table (e.g. a corpus's character
counts). Each example is (prompt, answer) text; `encode_examples` makes model batches with a mask on the
answer's target positions, for teacher-forced token accuracy.
"""
from __future__ import annotations

import numpy as np

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _draw(rng, symbols: str, weights, n: int, distinct: bool) -> list[str]:
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    idx = rng.choice(len(symbols), size=n, replace=not distinct, p=p)
    return [symbols[i] for i in idx]


def lookup(rng, num_pairs: int = 3, symbols: str = ALPHABET, weights=None) -> tuple[str, str]:
    keys = _draw(rng, symbols, weights, num_pairs, distinct=True)
    values = _draw(rng, symbols, weights, num_pairs, distinct=False)
    q = int(rng.integers(num_pairs))
    prompt = " ".join(f"{k}->{v}" for k, v in zip(keys, values)) + f" {keys[q]}->"
    return prompt, values[q]


def permutation(rng, width: int = 3, picks: int = 2, num_examples: int = 1, symbols: str = ALPHABET,
                weights=None) -> tuple[str, str]:
    pattern = rng.permutation(width)[:picks]
    parts = []
    for _ in range(num_examples):
        x = _draw(rng, symbols, weights, width, distinct=True)
        parts.append(" ".join(x) + "->" + " ".join(x[i] for i in pattern))
    x = _draw(rng, symbols, weights, width, distinct=True)
    prompt = " ".join(parts) + " " + " ".join(x) + "->"
    return prompt, " ".join(x[i] for i in pattern)


TASKS = {"lookup": lookup, "permutation": permutation}


def frequency_weights(text: str, symbols: str = ALPHABET) -> np.ndarray:
    """Counts of each symbol in `text` (+1 smoothing): the frequency-weighted variant."""
    counts = np.array([text.count(s) for s in symbols], np.float64) + 1.0
    return counts / counts.sum()


def make_examples(task: str, n: int, seed: int, weights=None, **kwargs) -> list[tuple[str, str]]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    rng = np.random.default_rng(seed)
    return [TASKS[task](rng, weights=weights, **kwargs) for _ in range(n)]


def encode_examples(examples, tokenizer, length: int | None = None) -> dict:
    """Batch for teacher-forced evaluation: {'inputs', 'targets', 'segment_ids', 'weights'} (N, L), where
    weights mark the answer tokens' target positions. Rows are right-padded (segment id 0)."""
    rows, answer_lens = [], []
    for prompt, answer in examples:
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
        rows.append(np.concatenate([p, a]))
        answer_lens.append(len(a))
    width = max(len(r) for r in rows) if length is None else length + 1
    n = len(rows)
    tokens = np.zeros((n, width), np.int32)
    seg = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.float32)
    for i, (r, a) in enumerate(zip(rows, answer_lens)):
        if len(r) > width:
            raise ValueError(f"example {i} has {len(r)} tokens, more than the length {width}")
        tokens[i, :len(r)] = r
        seg[i, :len(r)] = 1
        mask[i, len(r) - a:len(r)] = 1.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
            "weights": mask[:, 1:]}

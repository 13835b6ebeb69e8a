"""Batch sources over arrays of rows, with one vocabulary for every system.

A source has `batch_size`, `num_rows` (real rows), `num_batches` (batches in one pass over the rows) and
`get(index, rows) -> batch`. Batch `index` of pass (epoch) `index // num_batches` visits the rows in
`epoch_order(seed, epoch, num_rows, shuffle)`, so batch i is always the same data and a resumed run sees
exactly what an uninterrupted one would. `rows` selects this process's part of the global batch.
Example weights are always `weights`; padding rows carry `weights` 0.
"""
from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """The one epoch shuffler: a permutation of range(n) seeded by (seed, epoch), or range(n) in order."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


class ArraySource:
    """Batches of the rows of `arrays` (a dict of arrays with one leading length).

    shuffle   visit the rows in a fresh permutation each epoch (training) or in order (evaluation).
    drop_last drop the last partial batch (every batch full); otherwise it is padded to batch_size with
              zero rows whose `weights` are 0, so every row is seen once per pass.
    make      batch of real rows (dict) -> model batch (e.g. inputs and shifted targets); without it the
              arrays are the batch, with per-row `weights` 1 added when the arrays have none.
    what      what a row is, for the error when there are too few.
    """

    def __init__(self, arrays: dict, batch_size: int, *, seed: int = 0, shuffle: bool = False,
                 drop_last: bool = False, make=None, what: str = "rows"):
        lengths = {k: len(v) for k, v in arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"source arrays must share one leading length, got {lengths}")
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        n = next(iter(lengths.values()))
        if n == 0 or (drop_last and n < batch_size):
            raise ValueError(f"{n} {what} are fewer than one batch of {batch_size}; use more data, a shorter "
                             "sequence or a smaller batch")
        self.arrays, self.batch_size, self.seed, self.shuffle = arrays, int(batch_size), seed, shuffle
        self.make, self.num_rows = make, n
        self.num_batches = n // self.batch_size if drop_last else -(-n // self.batch_size)
        self._order = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, self.num_rows, self.shuffle))
        return self._order[1]

    def get(self, index: int, rows: slice = slice(None)) -> dict:
        epoch, i = divmod(index, self.num_batches)
        idx = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        batch = {k: v[idx] for k, v in self.arrays.items()}
        batch = self.make(batch) if self.make is not None else batch
        if "weights" not in batch:
            batch["weights"] = np.ones(len(idx), np.float32)
        pad = self.batch_size - len(idx)
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        return {k: v[rows] for k, v in batch.items()}


class MappedSource:
    """`base` with fn(batch, index, row_ids) applied to each batch; row_ids are the rows' positions in the
    global batch (e.g. to draw a per-row random key that does not depend on the process layout)."""

    def __init__(self, base, fn):
        self.base, self.fn = base, fn
        self.batch_size, self.num_rows, self.num_batches = base.batch_size, base.num_rows, base.num_batches

    def get(self, index: int, rows: slice = slice(None)) -> dict:
        return self.fn(self.base.get(index, rows), index, np.arange(self.batch_size)[rows])

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
        return _filled(batch, len(idx), self.batch_size, rows)


class MappedSource:
    """`base` with fn(batch, index, row_ids) applied to each batch; row_ids are the rows' positions in the
    global batch (e.g. to draw a per-row random key that does not depend on the process layout)."""

    def __init__(self, base, fn):
        self.base, self.fn = base, fn
        self.batch_size, self.num_rows, self.num_batches = base.batch_size, base.num_rows, base.num_batches

    def get(self, index: int, rows: slice = slice(None)) -> dict:
        return self.fn(self.base.get(index, rows), index, np.arange(self.batch_size)[rows])


def bucket_widths(full: int, quantum: int = 16) -> np.ndarray:
    """The widths a bucketed batch is cut to: quantum x {1, 1.5, 2, 3, 4, 6, ...} (rounded up to a multiple
    of `quantum`) below `full`, then `full` itself: about two compiled shapes per doubling of length."""
    if full < 1 or quantum < 1:
        raise ValueError(f"bucket widths need full >= 1 and quantum >= 1, got full={full}, quantum={quantum}")
    out, w = [], quantum
    while w < full:
        out += [w, -(-w * 3 // 2 // quantum) * quantum]
        w *= 2
    return np.unique(np.minimum([*out, full], full))


class BucketSource:
    """Batches of rows of similar length, each batch cut to the narrowest bucket width that holds it.

    Same contract as ArraySource, plus: `lengths` (N,) is each row's length along axis 1 of the arrays named
    in `cut` (the rest are per-row values); a batch's `cut` arrays are sliced to bucket_widths(...) >= its
    longest row, so a jitted step compiles once per width used. Each pass visits the rows sorted by length
    (ties in the epoch's random order), cut into batches whose order is shuffled per epoch when `shuffle`;
    with `drop_last`, the n % batch_size rows left out are random each epoch. `row_order(epoch)` is the row
    at each position of that pass, so per-row outputs of an evaluation pass map back with
    `out[row_order(0)] = outputs` (experiments.harness.map_rows does it).
    """

    def __init__(self, arrays: dict, lengths, batch_size: int, cut, *, seed: int = 0, shuffle: bool = False,
                 drop_last: bool = False, quantum: int = 16, what: str = "rows"):
        self.base = ArraySource(arrays, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last, what=what)
        self.lengths = np.asarray(lengths)
        n = self.base.num_rows
        if self.lengths.shape != (n,):
            raise ValueError(f"lengths has shape {self.lengths.shape}; expected ({n},), one per row")
        missing = [k for k in cut if k not in arrays or np.ndim(arrays[k]) < 2]
        if missing or not cut:
            raise ValueError(f"cut={list(cut)}: each must name an array of the source with a length axis 1; "
                             f"bad: {missing or 'none given'}")
        full = {int(arrays[k].shape[1]) for k in cut}
        if len(full) != 1:
            raise ValueError(f"the cut arrays {list(cut)} have widths {sorted(full)}; expected one width")
        self.full = full.pop()
        if self.lengths.min() < 0 or self.lengths.max() > self.full:
            raise ValueError(f"lengths span [{self.lengths.min()}, {self.lengths.max()}]; expected [0, {self.full}]")
        self.cut, self.widths = tuple(cut), bucket_widths(self.full, quantum)
        self.batch_size, self.num_rows, self.num_batches = self.base.batch_size, n, self.base.num_batches
        self.seed, self.shuffle, self._plan = seed, shuffle, (None, None)

    def _batches(self, epoch: int):
        """(row order of the pass, batch visiting order) for an epoch."""
        if self._plan[0] != epoch:
            order = self.base.order(epoch)[:self.num_batches * self.batch_size]  # drop_last: random rows out
            order = order[np.argsort(self.lengths[order], kind="stable")]
            visit = np.arange(self.num_batches)
            if self.shuffle:
                visit = np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_batches)
            self._plan = (epoch, (order, visit))
        return self._plan[1]

    def row_order(self, epoch: int = 0) -> np.ndarray:
        """The rows in the order one pass's batches hold them (batch 0's rows first)."""
        order, visit = self._batches(epoch)
        b = self.batch_size
        return np.concatenate([order[i * b:(i + 1) * b] for i in visit])

    def get(self, index: int, rows: slice = slice(None)) -> dict:
        epoch, i = divmod(index, self.num_batches)
        order, visit = self._batches(epoch)
        idx = order[visit[i] * self.batch_size:(visit[i] + 1) * self.batch_size]
        width = int(self.widths[np.searchsorted(self.widths, max(1, int(self.lengths[idx].max())))])
        batch = {k: v[idx][:, :width] if k in self.cut else v[idx] for k, v in self.base.arrays.items()}
        return _filled(batch, len(idx), self.batch_size, rows)


def _filled(batch: dict, n: int, batch_size: int, rows: slice) -> dict:
    """A batch of n real rows with `weights` (1 unless given), zero rows of weight 0 up to batch_size, then
    this process's `rows`."""
    if "weights" not in batch:
        batch["weights"] = np.ones(n, np.float32)
    if batch_size - n:
        batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    return {k: v[rows] for k, v in batch.items()}

"""The contract between a system (model + loss) and the training core."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Params = Any
Batch = dict


@runtime_checkable
class Task(Protocol):
    """What a system gives the core. Everything else (mesh, sharding, jit, optimizer, accumulation,
    checkpoints, logging) is the core's.

    init(rng, batch)        -> params; leaves may be boxed with flax logical axis names
                               (nn.with_logical_partitioning), which the core maps to mesh axes.
    loss(params, batch, rng) -> (scalar loss, dict of scalar metrics); called inside jit.
    Optional:
    tokens_per_example       int, for tokens/s (default 1: examples/s).
    eval_step(params, batch, rng) -> dict of scalar metrics averaged over eval batches (default: loss).
    frozen(path) -> bool     parameters that get no optimizer state and no updates.
    """

    def init(self, rng, batch: Batch) -> Params: ...

    def loss(self, params: Params, batch: Batch, rng) -> tuple[Any, dict]: ...


class BatchSource(Protocol):
    """A deterministic source of global batches: batch `index` is always the same data, so a resumed run
    sees exactly what an uninterrupted one would. `rows` selects this process's part of the global batch."""

    batch_size: int

    def get(self, index: int, rows: slice) -> Batch: ...

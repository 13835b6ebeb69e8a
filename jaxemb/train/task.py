"""The contract between a system (model + loss) and the training core."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Params = Any
Batch = dict


@runtime_checkable
class Task(Protocol):
    """What a system gives the core. Everything else (mesh, sharding, jit, optimizer, accumulation,
    checkpoints, logging, loading) is the core's.

    init(rng, batch)         -> params; leaves may be boxed with flax logical axis names
                                (nn.with_logical_partitioning), which the core maps to mesh axes.
    loss(params, batch, rng) -> (scalar loss, dict of scalar metrics); called inside jit.

    Optional:
    tokens_per_example       int, for tokens/s (default 1: examples/s).
    constants()              -> a dict of trees that are used but never trained (a pretrained encoder, a
                                glyph table, a frozen LM). Leaves are host arrays (numpy) or jax arrays,
                                optionally boxed with logical axis names (`jaxemb.train.logical`), or a
                                whole subtree is a `jaxemb.train.Pretrained(path, like)` read from disk.
                                The core places them sharded once, passes them to loss / eval_step /
                                map_batches functions as the keyword `constants=`, never donates them,
                                keeps them out of the optimizer state and the checkpoints, and takes no
                                gradient with respect to them.
    pretrained()             -> {top-level params key: checkpoint path}: after init, those subtrees of
                                the params are replaced by the trees saved there (`save_tree`), sharded on
                                arrival (fine-tuning from a pretrained model).
    frozen(path) -> bool     parameters inside the state that are not trained (partial fine-tuning): the
                                core applies stop_gradient to them before `loss` and gives them no
                                optimizer state and no updates, from this one declaration.
    decay(path) -> bool      whether AdamW's weight decay applies to a parameter (default: all of them).
    eval_step(params, batch, rng) -> {name: (sum, weight)}: the core adds sums and weights over all eval
                                batches and divides once, so ragged or padded batches cannot bias a
                                metric. Default: the loss and its metrics, each weighted by the batch's
                                `weights` sum (or its row count when it has no `weights`), which is exact
                                for metrics that are means over those weights.
    """

    def init(self, rng, batch: Batch) -> Params: ...

    def loss(self, params: Params, batch: Batch, rng) -> tuple[Any, dict]: ...


class BatchSource(Protocol):
    """A deterministic source of global batches: batch `index` is always the same data, so a resumed run
    sees exactly what an uninterrupted one would. `rows` selects this process's part of the global batch.
    Rows that are padding carry `weights` 0."""

    batch_size: int

    def get(self, index: int, rows: slice) -> Batch: ...

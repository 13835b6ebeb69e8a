"""The training core's config sections, shared by every system's config."""
from __future__ import annotations

import ml_collections

from jaxemb.train.mesh import DEFAULT_RULES


def core_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), num_devices=0)
    c.rules = [list(r) for r in DEFAULT_RULES]
    c.train = dict(
        steps=1000, batch_size=32, accum_steps=1, compute_dtype="float32",
        log_every=10, eval_every=0, eval_batches=4,
        checkpoint_every=500, keep_checkpoints=2, async_checkpoints=True, progress=True,
        best_metric="", best_mode="max", guard_nonfinite=False, on_config_change="refuse")  # best_metric: an eval metric; its best checkpoint goes to workdir/best
    c.optim = dict(name="adamw", lr=1e-3, end_lr=1e-4, warmup_steps=50, schedule="cosine",
                   b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01, clip_norm=1.0,
                   decay_steps=0, decay_rate=1.0)
    c.distributed = dict(coordinator="", num_processes=1, process_id=0, cpu_collectives="gloo")
    return c

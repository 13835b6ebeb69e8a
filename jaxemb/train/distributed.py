"""Multi-process set-up and assembly of global batches from per-process rows."""
from __future__ import annotations

import jax
import numpy as np


def maybe_initialize(cfg) -> None:
    """Calls jax.distributed.initialize when cfg.coordinator is set. Idempotent.

    coordinator = 'host:port' with num_processes and process_id, or 'auto' on TPU pods and clusters
    where JAX detects them itself (TPU VM metadata, SLURM, Open MPI). On CPU the cross-process
    collectives need gloo, set before the backend starts.
    """
    if not cfg.coordinator:
        return
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator == "auto":
        jax.distributed.initialize()
        return
    if cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)


def local_rows(sharding, global_batch: int) -> slice:
    """The contiguous rows of the global batch that this process's devices hold under `sharding`."""
    spans = set()
    for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
        sl = idx[0]
        spans.add((sl.start or 0, global_batch if sl.stop is None else sl.stop))
    spans = sorted(spans)
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise ValueError(f"this process's batch rows {spans} are not contiguous; "
                             "use a mesh whose data axis follows process order")
    return slice(spans[0][0], spans[-1][1])


def make_global(batch: dict, shardings: dict, global_batch: int) -> dict:
    """Assembles per-process numpy rows into global jax Arrays (works for one process too)."""
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        shape = (global_batch,) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(shardings[key], local, shape)
    return out

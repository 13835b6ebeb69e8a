"""Orbax checkpoints: periodic save, keep-N, restore of the latest step with the right shardings.

A checkpoint holds the train state (step, params, optimizer state, RNG key data) and a small JSON record
(data-iterator position and anything else the loop needs to continue exactly). Orbax writes each step to
a temporary directory and renames it when complete, so a run killed mid-save never leaves a half checkpoint.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        if not force and not (self.every and step % self.every == 0):
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        return True

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, meta) at `step` (default latest). `abstract_state` carries shapes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with shardings, the restore target for `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

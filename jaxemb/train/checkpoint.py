"""Orbax checkpoints: periodic save, keep-N, restore of the newest readable step with the right shardings.

A checkpoint holds the train state (step, params, optimizer state, RNG key data) and a small JSON record
(data-iterator position and anything else the loop needs to continue exactly). Orbax writes each step to
a temporary directory and renames it when complete, so a run killed mid-save never leaves a half checkpoint.
The directory is checked up front (a directory, writable); a failed save, synchronous or asynchronous,
raises CheckpointError naming the step and the path; a step that cannot be read back is reported in one
line, moved to `<directory>-damaged/<step>` (never deleted) and the next older one is used.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def check_directory(directory: str) -> None:
    """Raises NotADirectoryError / PermissionError naming `directory` unless it is (or can be made) a
    writable directory."""
    parent = directory
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        where = "" if parent == directory else f" (needed for the checkpoint directory {directory})"
        raise NotADirectoryError(f"{parent} is a file, not a directory{where}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise type(e)(e.errno, f"checkpoint directory {directory} is not writable ({e.strerror})") from None


def _release_orbax_threads() -> None:
    """After a failed asynchronous save, orbax leaves non-daemon signalling threads waiting for signals that
    never come, and the interpreter would wait for them at exit forever. They hold no data of ours; this
    drops them from the interpreter's exit join (CPython 3.11 / 3.12 keep those locks in
    threading._shutdown_locks; elsewhere it does nothing)."""
    locks = getattr(threading, "_shutdown_locks", None)
    guard = getattr(threading, "_shutdown_locks_lock", None)
    if locks is None or guard is None:
        return
    for t in threading.enumerate():
        if t is not threading.main_thread() and type(t).__module__.startswith("orbax"):
            lock = getattr(t, "_tstate_lock", None)
            with guard:
                locks.discard(lock)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = int(every)
        check_directory(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending = None  # step of an asynchronous save not yet known to be complete

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _failed(self, step, e):
        _release_orbax_threads()
        return CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                               f"{type(e).__name__}: {e}")

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        if not force and not (self.every and step % self.every == 0):
            return False
        self.wait()  # a previous asynchronous save's failure surfaces here, before anything new is written
        if step in self.manager.all_steps():
            return False
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._failed(step, e) from None
        self._pending = step
        return True

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, meta) at `step` (default latest). `abstract_state` carries shapes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_readable(self, abstract_state, log=print):
        """(state, meta) of the newest step that reads back; unreadable newer steps are reported in one line
        each and moved to `<directory>-damaged/`. None when there is no checkpoint at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return self.restore(abstract_state, step)
            except Exception as e:  # any reading failure: orbax, tensorstore, JSON, tree structure
                why = " ".join(str(e).split())[:200]
                aside = os.path.join(self.directory + "-damaged", str(step))
                if jax.process_index() == 0:  # one process moves it; every process skips it
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    if os.path.exists(aside):
                        aside = f"{aside}.{os.getpid()}"
                    shutil.move(os.path.join(self.directory, str(step)), aside)
                    log(f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: "
                        f"{why}); moved to {aside}, trying the next older one")
                distributed_barrier(f"damaged-{step}")
                self.manager.reload()
        return None

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self):
        """Blocks until pending saves are complete; raises CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._failed(step, e) from None
        self._pending = None

    def close(self):
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # already failed: report once, do not hang
                print(f"warning: closing checkpoints in {self.directory}: {e}", file=sys.stderr)


def distributed_barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with shardings, the restore target for `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

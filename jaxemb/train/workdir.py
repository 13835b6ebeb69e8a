"""A run directory: one run at a time (a lock), and the config it was started with (config.json).

The lock file `run.lock` holds the holder's pid, host and start time; a second run on the same workdir is
refused with those, and the lock of a process that no longer exists on this host is taken over. The
recorded config is compared with a rerun's: any difference in a key that changes the computation is
refused with the keys listed, unless `train.on_config_change` says "extend" (only train.steps may grow)
or "fresh" (the old run is moved to `previous-<time>/` and training starts again).
"""
from __future__ import annotations

import datetime
import json
import os
import socket

# Keys that say how to log, save or lay out a run, not what it computes. `study` is the studies' own
# section (what to measure after training); anything a study feeds into training is copied into train/model.
IGNORED = ("study.", "distributed.", "mesh.", "train.progress", "train.log_every", "train.eval_every",
           "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoints",
           "train.on_config_change", "train.best_metric", "train.best_mode")
RUN_FILES = ("checkpoints", "best", "metrics.jsonl", "config.json", "checkpoints-damaged")


class WorkdirInUse(RuntimeError):
    pass


class ConfigMismatch(ValueError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a workdir for the lifetime of a run (a context manager)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), "run.lock")
        self.enabled, self.held = enabled, False

    def __enter__(self):
        if not self.enabled:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.load(open(self.path))
                except (OSError, ValueError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    os.remove(self.path)  # a stale lock of a dead process on this host
                    continue
                raise WorkdirInUse(f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on host {host} "
                                   f"(since {holder.get('since')}); wait for it, or remove {self.path} if that "
                                   "run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirInUse(f"could not take the lock {self.path}")

    def __exit__(self, *exc):
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def _relevant(cfg: dict) -> dict:
    return {k: v for k, v in flat(cfg).items() if not any(k == i or k.startswith(i) for i in IGNORED)}


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=str))


def check_config(workdir: str, cfg: dict, mode: str, has_checkpoint: bool, log=print) -> None:
    """Records `cfg` in workdir/config.json on a new run; on a rerun refuses a config that differs (see the
    module docstring). `mode`: train.on_config_change."""
    path = os.path.join(workdir, "config.json")
    cfg = _jsonable(cfg)
    if os.path.exists(path):
        old = json.load(open(path))
        a, b = _relevant(old), _relevant(cfg)
        diff = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
        if diff and mode == "fresh":
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
            aside = os.path.join(workdir, f"previous-{stamp}")
            os.makedirs(aside)
            for name in RUN_FILES:
                if os.path.exists(os.path.join(workdir, name)):
                    os.replace(os.path.join(workdir, name), os.path.join(aside, name))
            log(f"config differs from the run in {workdir} ({', '.join(diff)}); train.on_config_change=fresh: "
                f"the old run moved to {aside}")
        elif diff:
            grow = mode == "extend" and diff == ["train.steps"]
            if grow and b["train.steps"] < a["train.steps"]:
                raise ConfigMismatch(f"{workdir} was trained to train.steps={a['train.steps']}; "
                                     f"train.steps={b['train.steps']} would not extend it")
            if not grow:
                lines = "; ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in diff)
                raise ConfigMismatch(
                    f"{workdir} holds a run with another config ({lines}). Use another --workdir, or "
                    "train.on_config_change=extend (only train.steps may grow) or =fresh (moves the old run "
                    "aside and starts again)")
    elif has_checkpoint:
        log(f"{workdir} has checkpoints but no config.json (an older run); recording this config")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1, sort_keys=True)
    os.replace(tmp, path)

"""Metrics: JSONL log (TensorBoard too when tensorboardX is installed) and a tqdm progress bar."""
from __future__ import annotations

import json
import os
import time

import numpy as np
from tqdm.auto import tqdm


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    return v


class MetricsWriter:
    """Appends one JSON object per line to `path`. On resume, records after `resume_step` are dropped
    (they belong to the part of the interrupted run that is being redone)."""

    def __init__(self, path: str, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill
                    if rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)
        self._tb = None
        try:
            from tensorboardX import SummaryWriter  # optional
            self._tb = SummaryWriter(os.path.join(os.path.dirname(path), "tb"))
        except ImportError:
            pass

    def write(self, step: int, split: str, metrics: dict):
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split, "time": time.time()}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if np.ndim(v) == 0:
                    self._tb.add_scalar(f"{split}/{k}", float(v), step)

    def close(self):
        if self.enabled and self._tb is not None:
            self._tb.close()


def read_metrics(path: str, split: str | None = None) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if split is None or r["split"] == split]


class Progress:
    """Progress bar with step, loss and tokens/s (tokens = examples x tokens_per_example)."""

    def __init__(self, total: int, initial: int, tokens_per_step: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                        mininterval=0.5)
        self.tokens_per_step = tokens_per_step
        self.last_time, self.last_step = time.perf_counter(), initial

    def update(self, step: int, loss: float) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.n = step
        self.bar.refresh()
        return rate

    def close(self):
        self.bar.close()

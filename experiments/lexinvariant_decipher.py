"""In-context deciphering (paper Sec. 3.3): `python -m experiments.lexinvariant decipher`.

Freezes the trained lexinvariant LM, trains a 2-layer MLP probe (through the training core) to read the
plaintext of each token of substitution-ciphered text from the LM's hidden state, then recovers each
sequence's key by majority vote over windows of `study.decipher_window` positions and reports key
precision against position.
"""
from __future__ import annotations

import copy
import os

import numpy as np

from experiments.common import save_figure, write_json
from jaxemb.models.decipher import DecipherProbeTask, key_precision, random_cipher
from jaxemb.train import Trainer


class CipherSource:
    """Wraps a text source: each row is encrypted with its own cipher, drawn from (seed, batch, row)."""

    def __init__(self, base, vocab_size: int, seed: int):
        self.base, self.vocab_size, self.seed = base, vocab_size, seed
        self.batch_size = base.batch_size

    def get(self, index, rows=slice(None)):
        b = self.base.get(index, rows)
        start = rows.start or 0
        keys = np.stack([random_cipher(np.random.default_rng([self.seed, index, start + r]), self.vocab_size)
                         for r in range(len(b["inputs"]))])
        return {"inputs": np.take_along_axis(keys, b["inputs"], axis=1), "plain": b["inputs"],
                "segment_ids": b["segment_ids"]}


def run(cfg, lm_task, lm_state, train, rows, workdir: str) -> dict:
    c = copy.deepcopy(cfg)
    c.train.update(steps=cfg.study.probe_steps, eval_every=0, checkpoint_every=cfg.study.probe_steps)
    vocab = cfg.model.vocab_size
    task = DecipherProbeTask(lm_task, lm_state["params"], cfg.study.probe_hidden)
    trainer = Trainer(task, c, os.path.join(workdir, "decipher_probe"))
    state = trainer.fit(CipherSource(train, vocab, cfg.seed + 5), desc="probe")
    source = CipherSource(rows, vocab, cfg.seed + 6)
    preds = np.concatenate(trainer.map_batches(task.predict, state["params"], source, rows.num_batches))
    batches = [source.get(i) for i in range(rows.num_batches)]
    cipher = np.concatenate([b["inputs"] for b in batches])
    plain = np.concatenate([b["plain"] for b in batches])
    window = cfg.study.decipher_window
    precision = key_precision(cipher, plain, preds, window)
    token_acc = float((preds == plain).mean())
    starts = list(range(0, plain.shape[1], window))
    print(f"\ndeciphering: probe token accuracy {100 * token_acc:.1f}% over {len(plain)} held-out sequences")
    print(f"{'positions':>12}{'key precision %':>18}")
    for s, p in zip(starts, precision):
        print(f"{f'{s + 1}-{min(s + window, plain.shape[1])}':>12}{100 * p:>18.1f}")
    results = {"window": window, "window_starts": starts, "key_precision": precision.tolist(),
               "probe_token_accuracy": token_acc, "sequences": int(len(plain)), "probe_steps": c.train.steps}
    write_json(os.path.join(workdir, "decipher.json"), results)
    _plot(starts, precision, window, os.path.join(workdir, "decipher.png"))
    return results


def _plot(starts, precision, window, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([s + window / 2 for s in starts], 100 * np.asarray(precision), marker="o")
    ax.set_xlabel("position (window centre)")
    ax.set_ylabel("key precision (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)

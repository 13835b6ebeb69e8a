"""In-context deciphering (paper Sec. 3.3): `python -m experiments.lexinvariant decipher`.

Freezes the trained lexinvariant LM, trains a 2-layer MLP probe (through the training core) to read the
plaintext of each token of substitution-ciphered text from the LM's hidden state, then recovers each
sequence's key by majority vote over windows of `study.decipher_window` positions and reports key
precision against position.
"""
from __future__ import annotations

import os

import numpy as np

from experiments import harness
from jaxemb.data.sources import MappedSource
from jaxemb.models.decipher import DecipherProbeTask, key_precision, random_cipher


def cipher_source(base, vocab_size: int, seed: int) -> MappedSource:
    """`base` with each row encrypted by its own cipher, drawn from (seed, batch index, row)."""
    def encrypt(batch, index, row_ids):
        keys = np.stack([random_cipher(np.random.default_rng([seed, index, int(r)]), vocab_size) for r in row_ids])
        return {"inputs": np.take_along_axis(keys, batch["inputs"], axis=1), "plain": batch["inputs"],
                "segment_ids": batch["segment_ids"], "weights": batch["weights"]}
    return MappedSource(base, encrypt)


def run(cfg, lm, data, workdir: str) -> dict:
    """lm: the trained lexinvariant harness.Variant; data: experiments.lexinvariant.prepare's result."""
    steps, vocab = cfg.study.probe_steps, data.derived["vocab_size"]
    c = harness.with_settings(cfg, **{"train.steps": steps, "train.eval_every": 0, "train.checkpoint_every": steps})
    task = DecipherProbeTask(lm.task, lm.params, cfg.study.probe_hidden)
    probe = harness.train_variant("decipher_probe", task, c, workdir, cipher_source(data.train, vocab, cfg.seed + 5),
                                  desc="probe")
    source = cipher_source(data.rows, vocab, cfg.seed + 6)
    preds = harness.map_rows(probe, task.predict, source)
    batches = [source.get(i) for i in range(source.num_batches)]
    cipher, plain = (np.concatenate([b[k] for b in batches])[:source.num_rows] for k in ("inputs", "plain"))
    window = cfg.study.decipher_window
    precision = key_precision(cipher, plain, preds, window)
    token_acc = float((preds == plain).mean())
    starts = list(range(0, plain.shape[1], window))
    print(f"\ndeciphering: probe token accuracy {100 * token_acc:.1f}% over {len(plain)} held-out sequences")
    harness.print_table([{"positions": f"{s + 1}-{min(s + window, plain.shape[1])}", "key precision %": 100 * p}
                         for s, p in zip(starts, precision)], width=16, fmt=".1f")
    results = harness.write_results(workdir, "decipher.json", {
        "window": window, "window_starts": starts, "key_precision": precision.tolist(),
        "probe_token_accuracy": token_acc, "sequences": int(len(plain)), "probe_steps": steps}, cfg, data.derived)
    harness.plot(os.path.join(workdir, "decipher.png"), [dict(
        lines=[dict(x=[s + window / 2 for s in starts], y=100 * np.asarray(precision), marker="o")],
        xlabel="position (window centre)", ylabel="key precision (%)", ylim=(0, 100))], figsize=(6, 3.6))
    return results

"""In-context deciphering probe (Huang et al. 2023, Sec. 3.3).

Text is encrypted with a random substitution cipher per sequence (a bijection of the vocabulary). A trained
LM is frozen; a 2-layer MLP probe reads its final hidden state at position t and predicts the plaintext of
the token at t through a separately learned embedding readout. The key is then recovered by majority vote
over windows of positions.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.nn.embeddings import token_nll


def random_cipher(rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    """A substitution cipher: a random permutation of the vocabulary (cipher[plain] = encrypted)."""
    return rng.permutation(vocab_size).astype(np.int32)


def recover_key(cipher_tokens: np.ndarray, predicted_plain: np.ndarray, window: int) -> list[dict]:
    """Per window of positions [k*window, (k+1)*window): cipher symbol -> the plaintext the probe predicted
    most often at its occurrences in that window (ties: the smallest id)."""
    keys = []
    for start in range(0, len(cipher_tokens), window):
        c, p = cipher_tokens[start:start + window], predicted_plain[start:start + window]
        key = {}
        for sym in np.unique(c):
            votes = np.bincount(p[c == sym])
            key[int(sym)] = int(np.argmax(votes))
        keys.append(key)
    return keys


def key_precision(cipher_rows, plain_rows, predicted_rows, window: int) -> np.ndarray:
    """Mean over rows of the fraction of cipher symbols in each window whose recovered plaintext is right.
    (num_windows,)"""
    per_window = []
    for c, x, p in zip(cipher_rows, plain_rows, predicted_rows):
        truth = dict(zip(c.tolist(), x.tolist()))
        per_window.append([np.mean([truth[s] == g for s, g in key.items()]) for key in recover_key(c, p, window)])
    return np.mean(np.asarray(per_window), axis=0)


class Probe(nn.Module):
    """2-layer MLP on hidden states; logits through a learned plaintext embedding table (V, d)."""
    vocab_size: int
    hidden: int
    dim: int

    @nn.compact
    def __call__(self, h):
        z = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.hidden)(h)))
        table = self.param("plain_embedding", nn.initializers.normal(self.dim ** -0.5), (self.vocab_size, self.dim))
        return z @ table.T


class DecipherProbeTask:
    """Trains only the probe. The LM's parameters are a core constant (`Task.constants`): placed once with
    their shardings, never in the optimizer state or the probe's checkpoints, no gradient taken."""

    def __init__(self, lm_task, lm_params, hidden: int = 256):
        self.lm, self.lm_params = lm_task, lm_params
        self.probe = Probe(lm_task.cfg.vocab_size, hidden, lm_task.cfg.d_model)
        self.tokens_per_example = lm_task.tokens_per_example

    def constants(self) -> dict:
        return {"lm": self.lm_params}

    def init(self, rng, batch):
        h = jnp.zeros(batch["inputs"].shape + (self.lm.cfg.d_model,), jnp.float32)
        return {"probe": self.probe.init(rng, h)}

    def logits(self, params, batch, rng, constants):
        _, hidden = self.lm.apply(constants["lm"], batch, rng)
        return self.probe.apply(params["probe"], jax.lax.stop_gradient(hidden["final"].astype(jnp.float32)))

    def loss(self, params, batch, rng, constants):
        nll = token_nll(self.logits(params, batch, rng, constants), batch["plain"])
        w = batch["segment_ids"] > 0
        loss = jnp.sum(nll * w) / jnp.maximum(w.sum(), 1)
        return loss, {}

    def predict(self, params, batch, rng, constants):
        return jnp.argmax(self.logits(params, batch, rng, constants), axis=-1)

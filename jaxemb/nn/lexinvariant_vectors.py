"""Per-sequence random token vectors for lexinvariant models, and a readout that never builds the table.

Token v of sequence b gets E[b, v] = N(0, I_d) drawn from fold_in(key_b, v), with key_b = fold_in(rng, b):
counter-based, so any row can be generated on its own, in any order, on any device. The materialised
(B, V, d) table (fine for bytes) and the blockwise readout (for 32K+ vocabularies) see the same vectors.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sequence_keys(rng, batch: int):
    """One key per sequence: fold_in(rng, b). (B,) key array."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))


def token_vectors(seq_keys, ids, dim: int, dtype=jnp.float32):
    """E[b, ids[b, ...]] for ids (B, ...) int -> (B, ..., dim), generated row by row."""
    def per_sequence(key, row):
        flat = row.reshape(-1)
        vecs = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (dim,), dtype))(flat)
        return vecs.reshape(*row.shape, dim)
    return jax.vmap(per_sequence)(seq_keys, ids)


def sequence_tables(rng, batch: int, vocab_size: int, dim: int, dtype=jnp.float32):
    """The whole table per sequence. (B, V, d)."""
    ids = jnp.broadcast_to(jnp.arange(vocab_size), (batch, vocab_size))
    return token_vectors(sequence_keys(rng, batch), ids, dim, dtype)


def blockwise_nll(h, seq_keys, targets, vocab_size: int, block: int, scale: float):
    """Next-token NLL under logits[b, t, v] = scale * h[b, t] . E[b, v], streaming the log-sum-exp over
    vocabulary blocks of `block` ids, so no (B, V, d) or (B, L, V) tensor exists; the backward pass
    regenerates each block (jax.checkpoint), so peak memory is O(B * block * (d + L)).

    h (B, L, d), seq_keys (B,), targets (B, L) int -> (B, L) float32.
    """
    b, length, dim = h.shape
    num_blocks = math.ceil(vocab_size / block)
    hf = h.astype(jnp.float32)
    neg = jnp.float32(-1e30)

    @jax.checkpoint
    def step(carry, j):
        peak, total = carry
        ids = j * block + jnp.arange(block)
        e = token_vectors(seq_keys, jnp.broadcast_to(jnp.minimum(ids, vocab_size - 1), (b, block)), dim)
        logits = jnp.einsum("bld,bvd->blv", hf, e) * scale
        logits = jnp.where(ids < vocab_size, logits, neg)  # ids past the vocabulary in the last block
        new_peak = jnp.maximum(peak, logits.max(-1))
        total = total * jnp.exp(peak - new_peak) + jnp.exp(logits - new_peak[..., None]).sum(-1)
        return (new_peak, total), None

    init = (jnp.full((b, length), neg), jnp.zeros((b, length), jnp.float32))
    (peak, total), _ = jax.lax.scan(step, init, jnp.arange(num_blocks))
    target_logit = jnp.einsum("bld,bld->bl", hf, token_vectors(seq_keys, targets, dim)) * scale
    return peak + jnp.log(total) - target_logit

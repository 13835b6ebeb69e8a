"""Embedding modules for the shared Transformer.

Every embedding module has two methods:
  encode(tokens)        -> (x (B, L, d), ctx)   input vectors, plus whatever the readout needs
  logits(h, ctx)        -> (B, L, V) float32    readout scores for hidden states h (B, L, d)
so a system swaps its embedding (learned, lexinvariant, frozen glyphs, a blockwise large-vocabulary
readout) without touching the Transformer.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxemb.nn.lexinvariant_vectors import blockwise_nll, sequence_keys, token_vectors


class TokenEmbedding(nn.Module):
    """Learned token table; readout tied to the table or a separate (untied) projection."""
    vocab_size: int
    dim: int
    tied: bool = True

    def setup(self):
        self.table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")), (self.vocab_size, self.dim))
        if not self.tied:
            self.head = nn.Dense(self.vocab_size, use_bias=False, kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.dim ** -0.5), ("embed", "vocab")), name="head")

    def encode(self, tokens):
        return jnp.take(self.table, tokens, axis=0), None

    def logits(self, h, ctx):
        if self.tied:
            return jnp.einsum("bld,vd->blv", h, self.table.astype(h.dtype)).astype(jnp.float32) * self.dim ** -0.5
        return self.head(h).astype(jnp.float32)


def token_nll(logits, targets):
    """Per-token negative log-likelihood in float32. (B, L)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


class LexinvariantEmbedding(nn.Module):
    """Lexinvariant embedding (Huang et al. 2023): a fresh Gaussian table E per sequence.

    Inside a sequence the same token always maps to the same vector; across sequences the vectors are
    independent, so no token has a fixed identity and the model must infer it from context. Input
    x_t = scale * E[x_t] + bias (learned scale and bias as in the paper's appendix); logits = h E^T / sqrt(d)
    with the same E (the constant 1/sqrt(d) only sets the initial logit scale; the final LayerNorm's
    scale is learned). E is keyed by the 'lexinv' rng stream and the sequence index, or given as `table`.
    """
    vocab_size: int
    dim: int
    scale_bias: bool = True
    readout_block: int = 0  # > 0: never build the table; stream the readout over blocks of this many ids

    @nn.compact
    def encode(self, tokens, table=None):
        keys = None
        if table is not None:
            x = jnp.take_along_axis(table, tokens[..., None], axis=1)  # (B, L, d): row tokens[b, t] of table b
        else:
            keys = sequence_keys(self.make_rng("lexinv"), tokens.shape[0])
            if self.readout_block:
                x = token_vectors(keys, tokens, self.dim)
            else:
                table = token_vectors(keys, jnp.broadcast_to(jnp.arange(self.vocab_size),
                                                             (tokens.shape[0], self.vocab_size)), self.dim)
                x = jnp.take_along_axis(table, tokens[..., None], axis=1)
        if self.scale_bias:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (self.dim,))
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.dim,))
            x = x * scale + bias
        return x, (table, keys)

    def logits(self, h, ctx):
        table, _ = ctx
        if table is None:
            raise ValueError("logits need the materialised table; with readout_block > 0 use nll()")
        return jnp.einsum("bld,bvd->blv", h, table.astype(h.dtype)).astype(jnp.float32) * self.dim ** -0.5

    def nll(self, h, ctx, targets):
        table, keys = ctx
        if table is None:
            return blockwise_nll(h, keys, targets, self.vocab_size, self.readout_block, self.dim ** -0.5)
        return token_nll(self.logits(h, ctx), targets)

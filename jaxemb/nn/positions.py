"""Position schemes: rotary embeddings (RoPE) and T5 relative position bias."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def segment_positions(segment_ids):
    """Position of each token inside its segment (restarts at 0 where the segment id changes). (B, L)."""
    length = segment_ids.shape[-1]
    idx = jnp.arange(length)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


def apply_rope(x, positions, base: float = 10000.0):
    """Rotates pairs (i, i + d/2) of the last axis of x (B, L, H, D) by position-dependent angles."""
    d = x.shape[-1]
    half = d // 2
    freq = 1.0 / (base ** (np.arange(half, dtype=np.float32) / half))
    angle = positions[..., None].astype(jnp.float32) * freq  # (B, L, half)
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def t5_bucket(relative, num_buckets: int, max_distance: int):
    """T5's causal (unidirectional) bucketing of relative = key_pos - query_pos <= 0."""
    n = jnp.maximum(-relative, 0)
    exact = num_buckets // 2
    is_small = n < exact
    large = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
                     / np.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return jnp.where(is_small, n, large)


class T5RelativeBias(nn.Module):
    """Learned per-head bias over log-spaced relative-distance buckets, shared by all layers. (1, H, L, L)."""
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128

    @nn.compact
    def __call__(self, length: int):
        table = self.param("rel_bias", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("relpos_buckets", "heads")), (self.num_buckets, self.num_heads))
        pos = jnp.arange(length)
        buckets = t5_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

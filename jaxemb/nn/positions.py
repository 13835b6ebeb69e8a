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


def rope_tables(positions, dim: int, base: float = 10000.0, max_position: int | None = None):
    """(cos, sin), each (B, 1, L, dim) float32, for rotating pairs (i, i + dim/2) by position angles.
    Heads-first layout, as the attention uses; computed once per forward pass and shared by every layer.

    With `max_position` (positions are known to lie in [0, max_position)), cos and sin are rows looked up
    in a constant (max_position, dim) table: XLA then fuses a cheap gather into each layer's RoPE instead
    of recomputing cos and sin there for every element and head (as it did on CPU).
    """
    half = dim // 2
    freq = 1.0 / (base ** (np.arange(half, dtype=np.float32) / half))
    freq = np.concatenate([freq, freq])
    if max_position is not None:
        angle = np.arange(max_position, dtype=np.float32)[:, None] * freq
        cos, sin = (jnp.take(np.asarray(f(angle), np.float32), positions, axis=0) for f in (np.cos, np.sin))
        return cos[:, None], sin[:, None]
    angle = positions[..., None].astype(jnp.float32) * freq
    return jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]


def apply_rope(x, cos, sin):
    """RoPE on x (B, H, L, D): x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1).

    This is the rotate-half form (GPT-NeoX, Llama, Hugging Face ESM/EsmModel): dimension i is paired with
    i + D/2 and rotated by position * base^(-2i/D), i < D/2. It is not the interleaved form (pairs (2i, 2i+1),
    RoFormer, GPT-J, Mesh TensorFlow); weights from such a model need their q/k output columns permuted.

    Applied after the heads-first transpose: there the backward's transpose back to the projection's
    layout is one pass; before it, XLA:CPU needed extra transposing copies.
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def t5_bucket(relative, num_buckets: int, max_distance: int, bidirectional: bool = False):
    """T5's bucket of relative = key_pos - query_pos. Distances below half the buckets get a bucket each,
    larger ones log-spaced buckets up to max_distance (beyond it the last bucket).
    Unidirectional (a decoder): the distance of keys at or before the query; later keys share bucket 0.
    Bidirectional (an encoder): half the buckets each way, keys after the query in the upper half."""
    if bidirectional:
        num_buckets //= 2
        n = jnp.abs(relative)
    else:
        n = jnp.maximum(-relative, 0)
    exact = num_buckets // 2
    is_small = n < exact
    large = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
                     / np.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    bucket = jnp.where(is_small, n, large)
    return bucket + jnp.where(relative > 0, num_buckets, 0) if bidirectional else bucket


class T5RelativeBias(nn.Module):
    """Learned per-head bias over log-spaced relative-distance buckets, shared by all layers. (1, H, L, L)."""
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = False

    @nn.compact
    def __call__(self, length: int):
        table = self.param("rel_bias", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("relpos_buckets", "heads")), (self.num_buckets, self.num_heads))
        pos = jnp.arange(length)
        buckets = t5_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance, self.bidirectional)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

"""Plain-jnp attention pooling: the numerical reference and the CPU path.

Everything is expressed over *ranges*: pooled row (b, s) attends over positions
``starts[b, s] <= l < ends[b, s]`` of ``x[b]``. Padded batches are one range per
row (``[0, length)``); packed inputs are one range per segment.
"""
import jax
import jax.numpy as jnp

from jax import lax


def ranges_from_lengths(lengths, seq_len):
  """lengths (B,) int -> starts, ends (B, 1) int32; lengths are clipped to [0, L]."""
  ends = jnp.clip(lengths.astype(jnp.int32), 0, seq_len)[:, None]
  return jnp.zeros_like(ends), ends


def ranges_from_segments(segment_ids, num_segments):
  """segment_ids (B, L) int -> starts, ends (B, S) int32.

  Segment ``s`` of row ``b`` covers the positions whose id equals ``s``; ids are
  non-decreasing along L and negative ids (padding) are trailing, so every
  segment is one contiguous run. Missing ids give empty ranges.
  """
  ids = segment_ids.astype(jnp.int32)
  big = jnp.iinfo(jnp.int32).max
  ids = jnp.where(ids < 0, big, ids)  # trailing padding sorts last
  k = jnp.arange(num_segments, dtype=jnp.int32)
  starts = jax.vmap(lambda row: jnp.searchsorted(row, k, side="left"))(ids)
  ends = jax.vmap(lambda row: jnp.searchsorted(row, k, side="right"))(ids)
  return starts.astype(jnp.int32), ends.astype(jnp.int32)


def range_mask(starts, ends, seq_len):
  """(B, S) ranges -> (B, S, L) bool mask of the positions each range covers."""
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  return (pos >= starts[..., None]) & (pos < ends[..., None])


def pool_ranges(x, queries, starts, ends):
  """Softmax-attention pooling over ranges.

  Args:
    x: (B, L, D) float inputs (any float dtype; computed in float32 or wider).
    queries: (H, D) folded queries, temperature already applied.
    starts, ends: (B, S) int ranges, ``0 <= start <= end <= L``.

  Returns:
    out: (B, S, H, D) float32 (float64 for float64 inputs),
      ``out[b, s, h] = sum_l softmax_l(x[b, l] . q[h]) x[b, l]`` over the range;
      empty ranges give zeros.
    lse: (B, S, H) log-sum-exp of the scores over the range (-inf when empty).
  """
  dtype = jnp.promote_types(jnp.promote_types(x.dtype, queries.dtype), jnp.float32)
  if x.shape[1] == 0:                                             # every range empty
    shape = starts.shape + (queries.shape[0],)
    return jnp.zeros(shape + (x.shape[2],), dtype), jnp.full(shape, -jnp.inf, dtype)
  mask = range_mask(starts, ends, x.shape[1])                    # (B, S, L)
  xf = jnp.where(mask.any(1)[..., None], x.astype(dtype), 0)     # padding -> 0
  scores = jnp.einsum("bld,hd->bhl", xf, queries.astype(dtype),
                      precision=lax.Precision.HIGHEST)
  scores = jnp.where(mask[:, :, None, :], scores[:, None], -jnp.inf)  # (B,S,H,L)
  m = lax.stop_gradient(scores.max(-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0)
  p = jnp.exp(scores - m)                                         # masked -> 0
  denom = p.sum(-1)
  safe = jnp.where(denom > 0, denom, 1)
  out = jnp.einsum("bshl,bld->bshd", p, xf,
                   precision=lax.Precision.HIGHEST) / safe[..., None]
  lse = jnp.where(denom > 0, m[..., 0] + jnp.log(safe), -jnp.inf)
  return out, lse

"""Mosaic TPU kernels for attention pooling over ranges (forward and backward).

Grid (B, L / block_l). Per row b the kernel walks the L blocks in order and keeps
online-softmax accumulators (m, l, acc) for every range of that row in VMEM. For
each block only the ranges that overlap it are visited (a dynamic loop over
``[seg_lo, seg_hi]``, scalar-prefetched), so x is read once even when packed
segments share a block. Blocks past the last valid position are skipped: their
index map repeats the previous block index, so Pallas issues no DMA for them.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Block sizes the dispatcher may pick (rows of x per grid step). Multiples of 128,
# so they satisfy the (8, 128) tiling rule for every dtype; D is always a full dim.
BLOCK_CHOICES = (128, 256, 512, 1024)
_BLOCK_BYTES = 2 * 1024 * 1024   # one x block; double-buffered by Pallas
# VMEM the kernels may use (buffers as laid out in VMEM, see vmem_bytes). The
# scoped default is 16 MiB on v4/v5e (32 MiB on v6e), so the kernels ask for
# their estimate plus headroom; 32 MiB stays under the physical VMEM of v4-v6e.
VMEM_BUDGET = 24 * 1024 * 1024
_VMEM_HEADROOM = 8 * 1024 * 1024


def _pad(n, m):
  return -(-n // m) * m


def vmem_bytes(block_l, segments, heads, dim, itemsize):
  """Upper estimate of the VMEM the forward or backward kernel uses (the larger):
  double-buffered blocks, scratch and the big temporaries, each padded to the
  (8 or 16, 128) VMEM tiles ((S, H, 1) arrays take 128 lanes per row)."""
  sub = 8 * (4 // itemsize)
  x = 2 * _pad(block_l, sub) * _pad(dim, 128) * itemsize
  q = 2 * _pad(heads, sub) * _pad(dim, 128) * itemsize
  state = segments * _pad(heads, 8) * _pad(dim, 128) * 4   # one (S, H, D) f32
  col = segments * _pad(heads, 8) * 128 * 4                # one (S, H, 1) f32
  temps = 4 * _pad(heads, 8) * _pad(block_l, 128) * 4 + 2 * _pad(block_l, 8) * _pad(dim, 128) * 4
  fwd = x + q + 3 * state + 4 * col + temps                # out x2, acc; lse x2, m, l
  bwd = (x + q + 2 * state + 4 * col + 2 * _pad(block_l, sub) * _pad(dim, 128) * itemsize
         + 2 * _pad(heads, 8) * _pad(dim, 128) * 4 + temps)  # g x2; lse, delta x2; dx, dq
  return max(fwd, bwd)


def fits_vmem(seq_len, segments, heads, dim, itemsize, block_l=None):
  bl = block_l or pick_block_l(seq_len, dim, itemsize)
  return vmem_bytes(bl, segments, heads, dim, itemsize) <= VMEM_BUDGET


def _params(block_l, segments, heads, dim, itemsize):
  need = vmem_bytes(block_l, segments, heads, dim, itemsize) + _VMEM_HEADROOM
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                              vmem_limit_bytes=max(need, 16 * 1024 * 1024))


def pick_block_l(seq_len, dim, itemsize):
  """Largest block in BLOCK_CHOICES whose x tile fits the budget, not past L."""
  best = BLOCK_CHOICES[0]
  for b in BLOCK_CHOICES:
    if b * dim * itemsize <= _BLOCK_BYTES:
      best = b
  while best > BLOCK_CHOICES[0] and best // 2 >= seq_len:
    best //= 2
  return best


def block_ranges(starts, ends, block_l, num_blocks):
  """Per (row, block): first and last range overlapping the block, and per row the
  last block holding a valid position. Returns flat int32 arrays (SMEM-friendly):
  seg_lo, seg_hi (B * nb,), last_block (B,)."""
  lo_pos = jnp.arange(num_blocks, dtype=jnp.int32) * block_l
  search = jax.vmap(jnp.searchsorted, in_axes=(0, None, None))
  seg_lo = search(ends, lo_pos, "right")                 # first end > block start
  seg_hi = search(starts, lo_pos + block_l, "left") - 1  # last start < block end
  last = jnp.maximum((ends[:, -1] - 1) // block_l, 0)
  i32 = lambda a: a.astype(jnp.int32).reshape(-1)
  return i32(seg_lo), i32(seg_hi), i32(last)


def _dot(a, b, dims, f32):
  prec = lax.Precision.HIGHEST if f32 else None
  return lax.dot_general(a, b, (dims, ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


_NT = ((1,), (1,))   # a @ b.T
_NN = ((1,), (0,))   # a @ b
_TN = ((0,), (0,))   # a.T @ b


def _fwd_kernel(seg_lo, seg_hi, last, starts, ends, q_ref, x_ref, out_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, block_l, num_blocks, num_segments):
  del last
  b, j = pl.program_id(0), pl.program_id(1)
  lo = seg_lo[b * num_blocks + j]
  hi = seg_hi[b * num_blocks + j]
  f32 = x_ref.dtype == jnp.float32

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(lo <= hi)
  def _compute():
    row0 = j * block_l
    first = starts[b * num_segments + lo]
    stop = ends[b * num_segments + hi]
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_l, 1), 0)
    x = jnp.where((rows >= first) & (rows < stop), x_ref[...], 0).astype(x_ref.dtype)
    s = _dot(q_ref[...], x, _NT, f32)                             # (H, bl)
    pos = row0 + lax.broadcasted_iota(jnp.int32, (1, block_l), 1)

    def body(k, carry):
      st = starts[b * num_segments + k]
      en = ends[b * num_segments + k]

      @pl.when(st < en)
      def _segment():
        valid = (pos >= st) & (pos < en)
        sk = jnp.where(valid, s, -jnp.inf)
        m_prev = m_sc[k]                                          # (H, 1)
        m_new = jnp.maximum(m_prev, sk.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(valid, jnp.exp(sk - m_new), 0.0)
        l_sc[k] = alpha * l_sc[k] + p.sum(axis=1, keepdims=True)
        acc_sc[k] = alpha * acc_sc[k] + _dot(p.astype(x.dtype), x, _NN, f32)
        m_sc[k] = m_new
      return carry

    lax.fori_loop(lo, hi + 1, body, 0)

  @pl.when(j == num_blocks - 1)
  def _finish():
    l = l_sc[...]
    nonempty = l > 0
    inv = 1.0 / jnp.where(nonempty, l, 1.0)
    out_ref[...] = jnp.where(nonempty, acc_sc[...] * inv, 0.0)
    lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(jnp.where(nonempty, l, 1.0)),
                             -jnp.inf)


def forward(x, queries, starts, ends, *, block_l=None, interpret=False):
  """Pallas TPU forward. x (B, L, D); queries (H, D) float32 (temperature folded);
  starts/ends (B, S) int32. Returns out (B, S, H, D) float32, lse (B, S, H) f32."""
  B, L, D = x.shape
  H = queries.shape[0]
  S = starts.shape[1]
  bl = block_l or pick_block_l(L, D, x.dtype.itemsize)
  nb = pl.cdiv(L, bl)
  seg_lo, seg_hi, last = block_ranges(starts, ends, bl, nb)
  kernel = functools.partial(_fwd_kernel, block_l=bl, num_blocks=nb, num_segments=S)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(B, nb),
      in_specs=[
          pl.BlockSpec((H, D), lambda b, j, *_: (0, 0)),
          pl.BlockSpec((None, bl, D),
                       lambda b, j, lo, hi, last, *_: (b, jnp.minimum(j, last[b]), 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, S, H, D), lambda b, j, *_: (b, 0, 0, 0)),
          pl.BlockSpec((None, S, H, 1), lambda b, j, *_: (b, 0, 0, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((S, H, 1), jnp.float32),
                      pltpu.VMEM((S, H, 1), jnp.float32),
                      pltpu.VMEM((S, H, D), jnp.float32)],
  )
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((B, S, H, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, S, H, 1), jnp.float32)],
      compiler_params=_params(bl, S, H, D, x.dtype.itemsize),
      interpret=_interpret(interpret),
      name="attention_pool_fwd_tpu",
  )(seg_lo, seg_hi, last, starts.reshape(-1), ends.reshape(-1),
    queries.astype(x.dtype), x)
  return out, lse[..., 0]


def _bwd_kernel(seg_lo, seg_hi, last, starts, ends, q_ref, x_ref, g_ref, lse_ref,
                delta_ref, dx_ref, dq_ref, *, block_l, num_blocks, num_segments):
  del last
  b, j = pl.program_id(0), pl.program_id(1)
  lo = seg_lo[b * num_blocks + j]
  hi = seg_hi[b * num_blocks + j]
  f32 = x_ref.dtype == jnp.float32

  @pl.when(j == 0)
  def _init():
    dq_ref[...] = jnp.zeros(dq_ref.shape, jnp.float32)

  @pl.when(lo > hi)
  def _padding():
    dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)

  @pl.when(lo <= hi)
  def _compute():
    row0 = j * block_l
    first = starts[b * num_segments + lo]
    stop = ends[b * num_segments + hi]
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_l, 1), 0)
    x = jnp.where((rows >= first) & (rows < stop), x_ref[...], 0).astype(x_ref.dtype)
    q = q_ref[...]
    s = _dot(q, x, _NT, f32)                                      # (H, bl)
    pos = row0 + lax.broadcasted_iota(jnp.int32, (1, block_l), 1)

    def body(k, dx):
      st = starts[b * num_segments + k]
      en = ends[b * num_segments + k]
      valid = (pos >= st) & (pos < en)
      p = jnp.where(valid, jnp.exp(jnp.where(valid, s, 0.0) - lse_ref[k]), 0.0)
      g = g_ref[k].astype(x.dtype)                                # (H, D)
      dp = _dot(g, x, _NT, f32)                                   # (H, bl)
      ds = p * (dp - delta_ref[k])                                # p = 0 off-range
      dq_ref[...] += _dot(ds.astype(x.dtype), x, _NN, f32)
      dx = dx + _dot(p.astype(x.dtype), g, _TN, f32)
      return dx + _dot(ds.astype(x.dtype), q, _TN, f32)

    dx = lax.fori_loop(lo, hi + 1, body, jnp.zeros((block_l, x.shape[1]), jnp.float32))
    dx_ref[...] = dx.astype(dx_ref.dtype)


def backward(x, queries, starts, ends, lse, g, delta, *, block_l=None,
             interpret=False):
  """Pallas TPU backward. g (B, S, H, D) cotangent of out; lse, delta (B, S, H) with
  delta = sum_d g * out. Returns dx (B, L, D) in x.dtype, dqueries (H, D) f32."""
  B, L, D = x.shape
  H = queries.shape[0]
  S = starts.shape[1]
  bl = block_l or pick_block_l(L, D, x.dtype.itemsize)
  nb = pl.cdiv(L, bl)
  seg_lo, seg_hi, last = block_ranges(starts, ends, bl, nb)
  kernel = functools.partial(_bwd_kernel, block_l=bl, num_blocks=nb, num_segments=S)
  per_row = lambda shape: pl.BlockSpec((None,) + shape, lambda b, j, *_: (b,) + (0,) * len(shape))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(B, nb),
      in_specs=[
          pl.BlockSpec((H, D), lambda b, j, *_: (0, 0)),
          pl.BlockSpec((None, bl, D),
                       lambda b, j, lo, hi, last, *_: (b, jnp.minimum(j, last[b]), 0)),
          per_row((S, H, D)), per_row((S, H, 1)), per_row((S, H, 1)),
      ],
      out_specs=[
          pl.BlockSpec((None, bl, D), lambda b, j, *_: (b, j, 0)),
          per_row((H, D)),
      ],
  )
  dx, dq = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((B, L, D), x.dtype),
                 jax.ShapeDtypeStruct((B, H, D), jnp.float32)],
      compiler_params=_params(bl, S, H, D, x.dtype.itemsize),
      interpret=_interpret(interpret),
      name="attention_pool_bwd_tpu",
  )(seg_lo, seg_hi, last, starts.reshape(-1), ends.reshape(-1),
    queries.astype(x.dtype), x, g.astype(jnp.float32),
    lse[..., None].astype(jnp.float32), delta[..., None].astype(jnp.float32))
  return dx, dq.sum(0)


def _interpret(interpret):
  """True -> the TPU interpreter (NaN-filled buffers, TPU memory semantics);
  "hlo" -> the generic Pallas interpreter (no cross-device state, so it also runs
  inside shard_map on simulated CPU devices); an InterpretParams is used as is."""
  if interpret is True:
    return pltpu.InterpretParams()
  if interpret == "hlo":
    return True
  return interpret or False

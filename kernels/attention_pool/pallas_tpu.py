"""Mosaic TPU kernels for attention pooling over ranges (forward and backward).

Grid (B, L / block_l). Per row b the kernel walks the L blocks in order and keeps
online-softmax accumulators (m, l, acc) for every range of that row in VMEM. For
each block only the ranges that overlap it are visited (a dynamic loop over
``[seg_lo, seg_hi]``, scalar-prefetched), so x is read once even when packed
segments share a block. Blocks past the last valid position are skipped: their
index map repeats the previous block index, so Pallas issues no DMA for them.

A block that one range covers whole takes an unmasked path; only the others
(range boundaries, the partial last block) mask x and the scores, so padding
(possibly NaN) never reaches a matmul. The backward needs three MXU passes per
range: [g; q] x^T gives (dp, s), ds x gives dq, [p; ds]^T [g; q] gives dx.
Batches whose scalar-prefetch tables would not fit SMEM run in batch chunks.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Block sizes the dispatcher may pick (rows of x per grid step). Multiples of 128,
# so they satisfy the (8, 128) tiling rule for every dtype; D is always a full dim.
# They are also the knob the accelerator check sweeps (sweep_blocks).
BLOCK_CHOICES = (128, 256, 512, 1024)
_BLOCK_BYTES = 2 * 1024 * 1024   # one x block; double-buffered by Pallas
# VMEM the kernels may use (buffers as laid out in VMEM, see vmem_bytes). The
# scoped default is 16 MiB on v4/v5e (32 MiB on v6e), so the kernels ask for
# their estimate plus headroom; 32 MiB stays under the physical VMEM of v4-v6e.
VMEM_BUDGET = 24 * 1024 * 1024
_VMEM_HEADROOM = 8 * 1024 * 1024
# SMEM is 1 MiB up to v6e; the scalar-prefetch tables of one call may take half.
SMEM_BUDGET = 512 * 1024


def _pad(n, m):
  return -(-n // m) * m


def _sub(itemsize):
  """Sublane rows of one VMEM tile: 8 for 32-bit, 16 for 16-bit dtypes."""
  return 8 * (4 // itemsize)


def _tile(rows, cols, itemsize):
  """Bytes of a (rows, cols) array laid out in (sublane, 128)-lane VMEM tiles."""
  return _pad(rows, _sub(itemsize)) * _pad(cols, 128) * itemsize


def head_pad(heads, itemsize):
  """Heads padded to whole tiles in the backward (so [g; q] and [p; ds] stack
  on tile boundaries)."""
  return _pad(heads, _sub(itemsize))


def vmem_bytes(block_l, segments, heads, dim, itemsize):
  """Upper estimate of the VMEM the forward or backward kernel uses (the larger):
  the double-buffered blocks Pallas allocates, the scratch, and the largest
  temporaries live at once, each padded to VMEM tiles ((S, H, 1) arrays take 128
  lanes per row)."""
  S, n = segments, itemsize
  hp = head_pad(heads, n)
  xb = _tile(block_l, dim, n)                   # one x block
  xf = _tile(block_l, dim, 4)                   # one f32 (bl, D) temporary
  fwd = (2 * xb + 2 * _tile(heads, dim, n)      # x, q blocks
         + 2 * S * _tile(heads, dim, 4)         # out block
         + 2 * S * _tile(heads, 1, 4)           # lse block
         + S * _tile(heads, dim, 4) + 2 * S * _tile(heads, 1, 4)   # acc, m, l
         + xb + xf                              # masked x (selected in f32)
         + 6 * _tile(heads, block_l, 4)         # scores, masks, probabilities
         + _tile(heads, dim, 4))                # p @ x
  bwd = (2 * xb + 2 * S * _tile(hp, dim, n)    # x, g blocks
         + 2 * _tile(hp, dim, n) + _tile(2 * hp, dim, n)  # q block, [g; q] scratch
         + 4 * S * _tile(hp, 1, 4)              # lse, delta blocks
         + 2 * xb + 2 * _tile(hp, dim, 4)       # dx, dq blocks
         + xf + _tile(2 * hp, block_l, n)       # dx and [p; ds] scratch
         + xb + xf                              # masked x; f32 select or dx pass
         + 2 * _tile(2 * hp, block_l, 4)        # [dp; s], [p; ds]
         + 4 * _tile(hp, block_l, 4)            # masks, p, ds
         + _tile(hp, dim, 4))                   # ds @ x
  return max(fwd, bwd)


def fits_vmem(seq_len, segments, heads, dim, itemsize, block_l=None):
  bl = block_l or default_block(seq_len, segments, heads, dim, itemsize)
  return vmem_bytes(bl, segments, heads, dim, itemsize) <= VMEM_BUDGET


def default_block(seq_len, segments, heads, dim, itemsize):
  """The block the kernels use when none is given: pick_block_l's, or the largest
  smaller choice when that one's buffers would not fit the VMEM budget (the
  smallest, which needs the least, when none does)."""
  fit = sweep_blocks(seq_len, segments, heads, dim, itemsize)
  return fit[-1] if fit else BLOCK_CHOICES[0]


def sweep_blocks(seq_len, segments, heads, dim, itemsize):
  """The block rows worth timing on hardware for one shape: every choice whose
  x tile stays within 2 MiB, that fits the VMEM budget, and is not past L."""
  top = pick_block_l(seq_len, dim, itemsize)
  return tuple(b for b in BLOCK_CHOICES
               if b <= top and vmem_bytes(b, segments, heads, dim, itemsize)
               <= VMEM_BUDGET)


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


def smem_bytes(rows, num_blocks, segments):
  """Bytes of the int32 scalar-prefetch tables for `rows` batch rows: seg_lo,
  seg_hi (rows * nb), starts, ends (rows * S), last (rows)."""
  return 4 * rows * (2 * num_blocks + 2 * segments + 1)


def batch_chunks(batch, num_blocks, segments):
  """[(first, stop)] row ranges whose tables fit SMEM_BUDGET; one when all do."""
  rows = SMEM_BUDGET // smem_bytes(1, num_blocks, segments)
  if rows == 0:
    raise ValueError(
        f"pallas_tpu: one batch row needs {smem_bytes(1, num_blocks, segments)} bytes "
        f"of scalar-prefetch tables ({num_blocks} blocks of x, {segments} segments), "
        f"more than the {SMEM_BUDGET} byte SMEM budget; use a larger block_l, fewer "
        f"segments, or implementation='xla'")
  return [(a, min(a + rows, batch)) for a in range(0, batch, rows)]


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


def _masked_x(x_ref, row0, first, stop):
  """x with rows outside [first, stop) zeroed. The mask is built at full (bl, D)
  shape and the select done in float32 (no i1 broadcast, no packed-bf16 select)."""
  shape = x_ref.shape
  rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
  keep = (rows >= first) & (rows < stop)
  return jnp.where(keep, x_ref[...].astype(jnp.float32), 0.0).astype(x_ref.dtype)


def _positions(row0, shape):
  return row0 + lax.broadcasted_iota(jnp.int32, shape, 1)


def _block_bounds(starts, ends, b, lo, hi, row0, block_l, num_segments):
  """(first, stop) of the ranges lo..hi, and whether range lo alone covers the
  whole block (then no position of the block needs a mask)."""
  first = starts[b * num_segments + lo]
  stop = ends[b * num_segments + hi]
  full = (lo == hi) & (first <= row0) & (stop >= row0 + block_l)
  return first, stop, full


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

  def update(k, s, x, valid):
    """Online-softmax step of range k; valid None means every position is in it."""
    sk = s if valid is None else jnp.where(valid, s, -jnp.inf)
    m_prev = m_sc[k]                                              # (H, 1)
    m_new = jnp.maximum(m_prev, sk.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(sk - m_new)
    if valid is not None:
      p = jnp.where(valid, p, 0.0)
    l_sc[k] = alpha * l_sc[k] + p.sum(axis=1, keepdims=True)
    acc_sc[k] = alpha * acc_sc[k] + _dot(p.astype(x.dtype), x, _NN, f32)
    m_sc[k] = m_new

  @pl.when(lo <= hi)
  def _compute():
    row0 = j * block_l
    first, stop, full = _block_bounds(starts, ends, b, lo, hi, row0, block_l,
                                      num_segments)

    @pl.when(full)
    def _full():
      x = x_ref[...]
      update(lo, _dot(q_ref[...], x, _NT, f32), x, None)

    @pl.when(jnp.logical_not(full))
    def _partial():
      x = _masked_x(x_ref, row0, first, stop)
      s = _dot(q_ref[...], x, _NT, f32)                           # (H, bl)
      pos = _positions(row0, s.shape)

      def body(k, carry):
        st = starts[b * num_segments + k]
        en = ends[b * num_segments + k]

        @pl.when(st < en)
        def _segment():
          update(k, s, x, (pos >= st) & (pos < en))
        return carry

      lax.fori_loop(lo, hi + 1, body, 0)

  @pl.when(j == num_blocks - 1)
  def _finish():
    l = l_sc[...]
    nonempty = l > 0
    inv = 1.0 / jnp.where(nonempty, l, 1.0)
    out_ref[...] = acc_sc[...] * inv            # empty ranges: acc stayed 0
    lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(jnp.where(nonempty, l, 1.0)),
                             -jnp.inf)


def _chunked(call, batch, num_blocks, segments):
  """Runs call(first, stop) per batch chunk; returns the list of results."""
  return [call(a, z) for a, z in batch_chunks(batch, num_blocks, segments)]


def forward(x, queries, starts, ends, *, block_l=None, interpret=False):
  """Pallas TPU forward. x (B, L, D); queries (H, D) float32 (temperature folded);
  starts/ends (B, S) int32. Returns out (B, S, H, D) float32, lse (B, S, H) f32."""
  B, L, D = x.shape
  H = queries.shape[0]
  S = starts.shape[1]
  bl = block_l or default_block(L, S, H, D, x.dtype.itemsize)
  nb = pl.cdiv(L, bl)
  kernel = functools.partial(_fwd_kernel, block_l=bl, num_blocks=nb, num_segments=S)
  q = queries.astype(x.dtype)

  def call(a, z):   # batch rows [a, z); x is indexed in place, never sliced
    seg_lo, seg_hi, last = block_ranges(starts[a:z], ends[a:z], bl, nb)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(z - a, nb),
        in_specs=[
            pl.BlockSpec((H, D), lambda b, j, *_: (0, 0)),
            pl.BlockSpec((None, bl, D),
                         lambda b, j, lo, hi, last, *_: (a + b, jnp.minimum(j, last[b]), 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, S, H, D), lambda b, j, *_: (b, 0, 0, 0)),
            pl.BlockSpec((None, S, H, 1), lambda b, j, *_: (b, 0, 0, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((S, H, 1), jnp.float32),
                        pltpu.VMEM((S, H, 1), jnp.float32),
                        pltpu.VMEM((S, H, D), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((z - a, S, H, D), jnp.float32),
                   jax.ShapeDtypeStruct((z - a, S, H, 1), jnp.float32)],
        compiler_params=_params(bl, S, H, D, x.dtype.itemsize),
        interpret=_interpret(interpret),
        name="attention_pool_fwd_tpu",
    )(seg_lo, seg_hi, last, starts[a:z].reshape(-1), ends[a:z].reshape(-1), q, x)

  parts = _chunked(call, B, nb, S)
  out = jnp.concatenate([o for o, _ in parts]) if len(parts) > 1 else parts[0][0]
  lse = jnp.concatenate([s for _, s in parts]) if len(parts) > 1 else parts[0][1]
  return out, lse[..., 0]


def _bwd_kernel(seg_lo, seg_hi, last, starts, ends, q_ref, x_ref, g_ref, lse_ref,
                delta_ref, dx_ref, dq_ref, dx_sc, w_sc, ps_sc, *, block_l, num_blocks,
                num_segments, heads):
  """Heads are padded to Hp (zero rows of q and g, so they add nothing). w_sc
  (2 Hp, D) stages [g_k; q], ps_sc (2 Hp, bl) [p; ds]; dx_sc (bl, D) accumulates
  dx over the ranges of a block."""
  del last
  hp = heads
  b, j = pl.program_id(0), pl.program_id(1)
  lo = seg_lo[b * num_blocks + j]
  hi = seg_hi[b * num_blocks + j]
  f32 = x_ref.dtype == jnp.float32
  dt = x_ref.dtype

  @pl.when(j == 0)
  def _init():
    dq_ref[...] = jnp.zeros(dq_ref.shape, jnp.float32)
    w_sc[hp:] = q_ref[...]

  @pl.when(lo > hi)
  def _padding():
    dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)

  def segment(k, x, valid):
    """dq += ds x; returns [p; ds]^T [g; q], this range's part of dx."""
    w_sc[:hp] = g_ref[k]
    w = w_sc[...]                                                 # [g_k; q]
    sd = _dot(w, x, _NT, f32)                                     # [dp; s] (2Hp, bl)
    dp, s = sd[:hp], sd[hp:]
    if valid is None:
      p = jnp.exp(s - lse_ref[k])
    else:
      p = jnp.where(valid, jnp.exp(jnp.where(valid, s, 0.0) - lse_ref[k]), 0.0)
    ds = p * (dp - delta_ref[k])                                  # p = 0 off-range
    ps_sc[:hp] = p.astype(dt)
    ps_sc[hp:] = ds.astype(dt)
    dq_ref[...] += _dot(ds.astype(dt), x, _NN, f32)
    return _dot(ps_sc[...], w, _TN, f32)                          # (bl, D)

  @pl.when(lo <= hi)
  def _compute():
    row0 = j * block_l
    first, stop, full = _block_bounds(starts, ends, b, lo, hi, row0, block_l,
                                      num_segments)

    @pl.when(full)
    def _full():
      dx_ref[...] = segment(lo, x_ref[...], None).astype(dx_ref.dtype)

    @pl.when(jnp.logical_not(full))
    def _partial():
      x = _masked_x(x_ref, row0, first, stop)
      pos = _positions(row0, (hp, block_l))
      dx_sc[...] = jnp.zeros(dx_sc.shape, jnp.float32)

      def body(k, carry):
        st = starts[b * num_segments + k]
        en = ends[b * num_segments + k]

        @pl.when(st < en)
        def _segment():
          dx_sc[...] += segment(k, x, (pos >= st) & (pos < en))
        return carry

      lax.fori_loop(lo, hi + 1, body, 0)
      dx_ref[...] = dx_sc[...].astype(dx_ref.dtype)


def backward(x, queries, starts, ends, lse, g, delta, *, block_l=None,
             interpret=False):
  """Pallas TPU backward. g (B, S, H, D) cotangent of out; lse, delta (B, S, H) with
  delta = sum_d g * out. Returns dx (B, L, D) in x.dtype, dqueries (H, D) f32."""
  B, L, D = x.shape
  H = queries.shape[0]
  S = starts.shape[1]
  dt = x.dtype
  bl = block_l or default_block(L, S, H, D, dt.itemsize)
  nb = pl.cdiv(L, bl)
  hp = head_pad(H, dt.itemsize)
  heads = lambda a: jnp.pad(a.astype(jnp.float32),
                            [(0, 0)] * (a.ndim - 2) + [(0, hp - H), (0, 0)])
  g, q = heads(g).astype(dt), heads(queries).astype(dt)
  col = lambda a: heads(a[..., None])                             # (B, S, Hp, 1)
  lse, delta = col(lse), col(delta)
  kernel = functools.partial(_bwd_kernel, block_l=bl, num_blocks=nb, num_segments=S,
                             heads=hp)
  per_row = lambda shape: pl.BlockSpec((None,) + shape,
                                       lambda b, j, *_: (b,) + (0,) * len(shape))

  def call(a, z):   # batch rows [a, z); x is indexed in place, never sliced
    seg_lo, seg_hi, last = block_ranges(starts[a:z], ends[a:z], bl, nb)
    x_spec = pl.BlockSpec((None, bl, D),
                          lambda b, j, lo, hi, last, *_: (a + b, jnp.minimum(j, last[b]), 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(z - a, nb),
        in_specs=[pl.BlockSpec((hp, D), lambda b, j, *_: (0, 0)), x_spec,
                  per_row((S, hp, D)), per_row((S, hp, 1)), per_row((S, hp, 1))],
        out_specs=[pl.BlockSpec((None, bl, D), lambda b, j, *_: (b, j, 0)),
                   per_row((hp, D))],
        scratch_shapes=[pltpu.VMEM((bl, D), jnp.float32),
                        pltpu.VMEM((2 * hp, D), dt),
                        pltpu.VMEM((2 * hp, bl), dt)],
    )
    dx, dq = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((z - a, L, D), dt),
                   jax.ShapeDtypeStruct((z - a, hp, D), jnp.float32)],
        compiler_params=_params(bl, S, H, D, dt.itemsize),
        interpret=_interpret(interpret),
        name="attention_pool_bwd_tpu",
    )(seg_lo, seg_hi, last, starts[a:z].reshape(-1), ends[a:z].reshape(-1), q, x,
      g[a:z], lse[a:z], delta[a:z])
    return dx, dq.sum(0)

  # Chunks (only when the SMEM tables of the whole batch would not fit) each
  # write their rows of dx; the concatenation copies dx once.
  parts = _chunked(call, B, nb, S)
  dx = jnp.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
  return dx, sum(dq for _, dq in parts)[:H]


def _interpret(interpret):
  """True -> the TPU interpreter (NaN-filled buffers, TPU memory semantics);
  "hlo" -> the generic Pallas interpreter (no cross-device state, so it also runs
  inside shard_map on simulated CPU devices); an InterpretParams is used as is."""
  if interpret is True:
    return pltpu.InterpretParams()
  if interpret == "hlo":
    return True
  return interpret or False

"""GPU kernels for attention pooling over ranges (forward and backward).

Backend: Pallas' Triton lowering (``pl.pallas_call`` with Triton compiler
params), the one GPU backend every supported JAX lowers for this op. Upstream
deprecates it from JAX 0.11; it still ships in 0.12. The backend lives only in
this file; when it is missing, ``AVAILABLE`` is False and ``auto`` uses XLA.

Why not Mosaic GPU yet (checked without a GPU, JAX 0.10.2 and 0.12.0.1): in 0.11+
``pl.pallas_call`` has no Mosaic GPU rule any more (it fails with an
AssertionError in the GPU lowering; Mosaic GPU is reached only through
``plgpu.kernel``, whose signature differs between 0.10 and 0.12), and in 0.10.2
a pallas_call of this kernel shape fails in Mosaic GPU layout inference (an iota
needs ``plgpu.layout_cast``; broadcast-and-reduce scores give "Incompatible
FragmentedArray layouts"). Mosaic GPU lowers no ``dot_general``: matmuls are
``plgpu.wgmma`` (Hopper) or ``tcgen05_mma`` (Blackwell) on swizzled shared
memory with at least 64 rows, and masked partial loads do not exist (TMA copies
plus explicit barriers instead). A port is a rewrite per GPU generation, and 0.10
has no Mosaic GPU interpreter to test it on CPU; it waits for a lent GPU.

Forward: grid (B, S, head tiles x splits). Each program pools one range (row b,
segment s) for a tile of heads over one chunk of that range, with an online
softmax over power-of-two row blocks; chunks ("split-L", used when B x S x heads
is too small to fill the GPU) are merged with a log-sum-exp in XLA.
Backward: grid (B, S, splits); each program owns the rows of its chunk, so dx is
written without atomics; dq partials are summed in XLA.
All tiles are powers of two: D and H are padded (H to at least 16, the smallest
Triton dot); x itself is never copied, its loads are masked (masked-off elements
read as 0 and scores of masked rows are set to -inf with jnp.where).

Lowering without a GPU (tests, AOT): JAX >= 0.11 needs a target GPU; wrap the
``.lower(lowering_platforms=("cuda",))`` call in ``abstract_gpu()``.
"""
import contextlib
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jax.experimental.pallas import triton as pltriton
  _Params = getattr(pltriton, "CompilerParams", None) or getattr(
      pltriton, "TritonCompilerParams")
  AVAILABLE = True
except (ImportError, AttributeError):  # a JAX without the Triton backend
  pltriton = _Params = None
  AVAILABLE = False

BLOCK_CHOICES = (16, 32, 64, 128)   # rows of x per loop step
HEAD_TILES = (16, 32, 64)           # heads per program
_X_TILE_BYTES = 32 * 1024           # one x tile in registers / shared memory
_ACC_FLOATS = 16 * 1024             # f32 accumulator elements per program
_NUM_SMS = 132                      # H100/H200 SXM; split-L sizing without a GPU
DEFAULT_GPU = "NVIDIA H100 80GB HBM3"


def abstract_gpu(device_kind=DEFAULT_GPU, num_cores=_NUM_SMS):
  """Context manager making the Triton lowering target ``device_kind`` when no
  GPU is present. JAX >= 0.11 reads the target from the abstract mesh's
  AbstractDevice ("No supported GPU devices found" without one); older JAX
  ignores it and targets compute capability 9.0. A no-op where the JAX has no
  AbstractDevice."""
  sharding = jax.sharding
  if not (hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh")):
    return contextlib.nullcontext()
  fields = {f.name for f in dataclasses.fields(sharding.AbstractDevice)}
  kw = dict(device_kind=device_kind, num_cores=num_cores, platform="gpu")
  device = sharding.AbstractDevice(**{k: v for k, v in kw.items() if k in fields})
  axis_types = getattr(sharding, "AxisType", None)
  extra = {} if axis_types is None else {"axis_types": (axis_types.Auto,)}
  mesh = sharding.AbstractMesh((1,), ("_gpu",), abstract_device=device, **extra)
  return sharding.use_abstract_mesh(mesh)


def _sm_count():
  """Streaming multiprocessors of the local GPU; _NUM_SMS when there is none."""
  try:
    return int(jax.devices("gpu")[0].core_count)
  except Exception:  # no GPU backend, or a device without core_count
    return _NUM_SMS


def config(seq_len, dim, heads, itemsize, block_l=None):
  """Static tiling for a shape: (block_l, head_tile, padded D, padded H, warps)."""
  dp = max(16, pl.next_power_of_2(dim))
  hp = max(16, pl.next_power_of_2(heads))
  bl = block_l
  if bl is None:
    bl = BLOCK_CHOICES[0]
    for b in BLOCK_CHOICES:
      if b * dp * itemsize <= _X_TILE_BYTES:
        bl = b
    while bl > BLOCK_CHOICES[0] and bl // 2 >= seq_len:
      bl //= 2
  ht = HEAD_TILES[0]
  for h in HEAD_TILES:
    if h <= hp and h * dp <= _ACC_FLOATS:
      ht = h
  warps = 4 if dp * ht <= 4096 else 8
  return bl, ht, dp, hp, warps


def num_splits(batch, segments, head_tiles, seq_len, block_l, sms=None):
  """Split-L factor: enough programs to fill the GPU, at least 4 blocks each."""
  programs = batch * segments * head_tiles
  want = max(1, (2 * (sms or _sm_count()) + programs - 1) // programs)
  most = max(1, seq_len // (4 * block_l))
  n = 1
  while n * 2 <= min(want, most):
    n *= 2
  return n


def _chunk(st, en, c, splits, block_l):
  """Row range [c_st, c_en) of split c of range [st, en) and its block count."""
  n = en - st
  per = ((n + splits - 1) // splits + block_l - 1) // block_l * block_l
  c_st = st + c * per
  c_en = jnp.minimum(c_st + per, en)
  nblk = jnp.maximum((c_en - c_st + block_l - 1) // block_l, 0)
  return c_st, c_en, nblk


def _dot(a, b, trans_a=False, trans_b=False):
  f32 = a.dtype == jnp.float32
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                         precision=lax.Precision.HIGHEST if f32 else None)


def _load_rows(x_ref, row0, c_en, block_l, dim):
  """x[row0 : row0 + block_l, :] as a (block_l, Dp) tile; rows >= c_en and
  columns >= dim read as 0. Returns the tile and the (block_l,) row mask."""
  rows = row0 + jnp.arange(block_l)
  rmask = rows < c_en
  cmask = jnp.arange(x_ref.shape[-1]) < dim
  x = pltriton.load(x_ref.at[pl.ds(row0, block_l), :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
  return x, rmask


def _fwd_kernel(starts_ref, ends_ref, q_ref, x_ref, out_ref, lse_ref, *,
                block_l, splits, dim):
  k, c = pl.program_id(1), pl.program_id(2) % splits
  c_st, c_en, nblk = _chunk(starts_ref[k], ends_ref[k], c, splits, block_l)
  q = q_ref[...]                                                  # (Ht, Dp)
  ht = q.shape[0]

  def body(i, carry):
    acc, m, l = carry
    x, rmask = _load_rows(x_ref, c_st + i * block_l, c_en, block_l, dim)
    s = jnp.where(rmask[None, :], _dot(q, x, trans_b=True), -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(x.dtype), x)
    return acc, m_new, l

  init = (jnp.zeros(out_ref.shape, jnp.float32),
          jnp.full((ht,), -jnp.inf, jnp.float32), jnp.zeros((ht,), jnp.float32))
  acc, m, l = lax.fori_loop(0, nblk, body, init)
  nonempty = l > 0
  safe = jnp.where(nonempty, l, 1.0)
  out_ref[...] = jnp.where(nonempty[:, None], acc / safe[:, None], 0.0)
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe), -jnp.inf)


def _pad_queries(queries, hp, dp, dtype):
  H, D = queries.shape
  return jnp.pad(queries, ((0, hp - H), (0, dp - D))).astype(dtype)


def _require():
  if not AVAILABLE:
    raise NotImplementedError("this JAX has no Pallas Triton backend; use "
                              "implementation='xla'")


def forward(x, queries, starts, ends, *, block_l=None, interpret=False, sms=None):
  """Pallas GPU forward. x (B, L, D); queries (H, D) float32 (temperature folded);
  starts/ends (B, S) int32. Returns out (B, S, H, D) float32, lse (B, S, H) f32."""
  _require()
  B, L, D = x.shape
  H, S = queries.shape[0], starts.shape[1]
  bl, ht, dp, hp, warps = config(L, D, H, x.dtype.itemsize, block_l)
  nh = hp // ht
  ns = num_splits(B, S, nh, L, bl, sms)
  kernel = functools.partial(_fwd_kernel, block_l=bl, splits=ns, dim=D)
  out, lse = pl.pallas_call(
      kernel,
      grid=(B, S, nh * ns),
      in_specs=[
          pl.BlockSpec((None, S), lambda b, k, c: (b, 0)),
          pl.BlockSpec((None, S), lambda b, k, c: (b, 0)),
          pl.BlockSpec((ht, dp), lambda b, k, c: (c // ns, 0)),
          pl.BlockSpec((None, L, dp), lambda b, k, c: (b, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, ht, dp),
                       lambda b, k, c: (b, k, c % ns, c // ns, 0)),
          pl.BlockSpec((None, None, None, ht), lambda b, k, c: (b, k, c % ns, c // ns)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, S, ns, hp, dp), jnp.float32),
                 jax.ShapeDtypeStruct((B, S, ns, hp), jnp.float32)],
      compiler_params=_Params(num_warps=warps, num_stages=2),
      interpret=bool(interpret),
      name="attention_pool_fwd_gpu",
  )(starts, ends, _pad_queries(queries, hp, dp, x.dtype), x)
  out, lse = _merge_splits(out, lse)
  return out[:, :, :H, :D], lse[:, :, :H]


def _merge_splits(out, lse):
  """(B, S, n, H, Dp), (B, S, n, H) chunk results -> one softmax per range."""
  if out.shape[2] == 1:
    return out[:, :, 0], lse[:, :, 0]
  top = lse.max(axis=2, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top)                                          # empty -> 0
  total = w.sum(axis=2)
  safe = jnp.where(total > 0, total, 1.0)
  merged = (w[..., None] * out).sum(axis=2) / safe[..., None]
  merged_lse = jnp.where(total > 0, top[:, :, 0] + jnp.log(safe), -jnp.inf)
  return merged, merged_lse


def _bwd_kernel(starts_ref, ends_ref, q_ref, x_ref, g_ref, lse_ref, delta_ref,
                dx_ref, dq_ref, *, block_l, splits, dim, head_tile, barrier):
  k, c = pl.program_id(1), pl.program_id(2)
  c_st, c_en, nblk = _chunk(starts_ref[k], ends_ref[k], c, splits, block_l)
  cmask = jnp.arange(dx_ref.shape[-1]) < dim
  num_tiles = q_ref.shape[0] // head_tile

  for t in range(num_tiles):                     # static: usually one tile
    heads = pl.ds(t * head_tile, head_tile)
    q = q_ref.at[heads, :][...]                                   # (Ht, Dp)
    g = g_ref.at[heads, :][...].astype(q.dtype)
    lse = lse_ref.at[heads][...]
    delta = delta_ref.at[heads][...]

    def body(i, dq, t=t, q=q, g=g, lse=lse, delta=delta):
      row0 = c_st + i * block_l
      x, rmask = _load_rows(x_ref, row0, c_en, block_l, dim)
      s = _dot(q, x, trans_b=True)                                # (Ht, bl)
      p = jnp.where(rmask[None, :], jnp.exp(s - lse[:, None]), 0.0)
      ds = p * (_dot(g, x, trans_b=True) - delta[:, None])
      dq = dq + _dot(ds.astype(x.dtype), x)
      dx = _dot(p.astype(x.dtype), g, trans_a=True) + _dot(ds.astype(x.dtype), q,
                                                           trans_a=True)
      mask = rmask[:, None] & cmask[None, :]
      rows = dx_ref.at[pl.ds(row0, block_l), :]
      if t:                                      # accumulate over head tiles
        dx = dx + pltriton.load(rows, mask=mask, other=0.0).astype(jnp.float32)
      pltriton.store(rows, dx.astype(dx_ref.dtype), mask=mask)
      return dq

    dq = lax.fori_loop(0, nblk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref.at[heads, :][...] = dq
    if barrier and t + 1 < num_tiles:
      # The next tile reads back dx rows this tile stored, maybe from other
      # threads of the program: a CTA barrier makes those stores visible.
      pltriton.debug_barrier()

  # The last program of a row zeroes dx on its trailing padding.
  @pl.when((k == pl.num_programs(1) - 1) & (c == splits - 1))
  def _zero_padding():
    pad0 = ends_ref[k]
    length = x_ref.shape[0]

    def zero(i, carry):
      row0 = pad0 + i * block_l
      rmask = (row0 + jnp.arange(block_l)) < length
      pltriton.store(dx_ref.at[pl.ds(row0, block_l), :],
                     jnp.zeros((block_l, dx_ref.shape[-1]), dx_ref.dtype),
                     mask=rmask[:, None] & cmask[None, :])
      return carry

    lax.fori_loop(0, (length - pad0 + block_l - 1) // block_l, zero, 0)


def backward(x, queries, starts, ends, lse, g, delta, *, block_l=None,
             interpret=False, sms=None):
  """Pallas GPU backward. g (B, S, H, D) cotangent of out; lse, delta (B, S, H),
  delta = sum_d g * out. Returns dx (B, L, D) in x.dtype, dqueries (H, D) f32."""
  _require()
  B, L, D = x.shape
  H, S = queries.shape[0], starts.shape[1]
  bl, ht, dp, hp, warps = config(L, D, H, x.dtype.itemsize, block_l)
  nh = hp // ht
  ns = num_splits(B, S, 1, L, bl, sms)
  dx_dtype = x.dtype if nh == 1 else jnp.float32    # f32 when summing head tiles
  pad_h = ((0, 0), (0, 0), (0, hp - H))
  lse = jnp.pad(jnp.where(jnp.isfinite(lse), lse, 0.0), pad_h)
  kernel = functools.partial(_bwd_kernel, block_l=bl, splits=ns, dim=D, head_tile=ht,
                             barrier=not interpret)
  row = lambda b, k, c: (b, 0)
  dx, dq = pl.pallas_call(
      kernel,
      grid=(B, S, ns),
      in_specs=[
          pl.BlockSpec((None, S), row),
          pl.BlockSpec((None, S), row),
          pl.BlockSpec((hp, dp), lambda b, k, c: (0, 0)),
          pl.BlockSpec((None, L, dp), lambda b, k, c: (b, 0, 0)),
          pl.BlockSpec((None, None, hp, dp), lambda b, k, c: (b, k, 0, 0)),
          pl.BlockSpec((None, None, hp), lambda b, k, c: (b, k, 0)),
          pl.BlockSpec((None, None, hp), lambda b, k, c: (b, k, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, L, dp), lambda b, k, c: (b, 0, 0)),
          pl.BlockSpec((None, None, None, hp, dp), lambda b, k, c: (b, k, c, 0, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, L, D), dx_dtype),
                 jax.ShapeDtypeStruct((B, S, ns, hp, dp), jnp.float32)],
      compiler_params=_Params(num_warps=warps, num_stages=2),
      interpret=bool(interpret),
      name="attention_pool_bwd_gpu",
  )(starts, ends, _pad_queries(queries, hp, dp, x.dtype), x,
    jnp.pad(g.astype(jnp.float32), ((0, 0), (0, 0), (0, hp - H), (0, dp - D))),
    lse, jnp.pad(delta.astype(jnp.float32), pad_h))
  return dx.astype(x.dtype), dq.sum(axis=(0, 1, 2))[:H, :D]

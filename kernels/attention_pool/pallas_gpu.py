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

Forward: grid (head tiles x D chunks, B, S x splits). Each program pools one
range (row b, segment s) for a tile of heads over one chunk of that range, with
an online softmax over power-of-two row blocks, and accumulates one chunk of D
columns (the scores always use all of D). Chunks of the range ("split-L", used
when B x S x heads is too small to fill the GPU, at least _MIN_CHUNK rows each)
are merged with a log-sum-exp in XLA. Partials are stored as H x D only.
Backward: grid (D chunks, B, S x splits); each program owns the rows of its
chunk and one chunk of D columns and loops over all head tiles per row block, so
dx is stored once per element, never read back, and written without atomics; dq
partials are summed in XLA. The padding after a row's last range is zeroed by all
programs of that row, a slice each. The ranges of a row must tile
[0, ends[b, -1]) (as api.py builds them from lengths or sorted segment ids):
dx rows outside every range and before the last end are not written.
The head-tile and D-chunk axes come first in both grids (program_id(0) is the
fastest-launched axis), so programs reading the same x rows run together and all
but the first find those rows in L2.
All tiles are powers of two: D and H are padded (H to at least 16, the smallest
Triton dot); x itself is never copied, its loads are masked (masked-off elements
read as 0 and scores of masked rows are set to -inf with jnp.where). Out blocks
may be larger than the (H, D) arrays: the Triton lowering addresses a block with
the strides of the whole array and every store here is masked; interpret mode
pads the arrays to whole blocks and slices the padding off.

Budgets (``config``, estimates that the accelerator sweep checks): per program,
the f32 accumulators and score tiles get at most _REGS_PER_THREAD registers per
thread, and the pipelined x tiles plus the dot operands at most _SMEM_BYTES of
shared memory. Where the whole of D does not fit (e.g. D = 1280 fp32, padded to
2048), D is chunked over programs (the D-chunk grid axis; each program recomputes
the scores over all of D); where no chunk fits, ``config`` raises BudgetError, a
ValueError (``fits`` tells up front, for an XLA fallback).
Precision of float32 dots (``precision``): "highest" is IEEE fp32 FMA on CUDA
cores (no tensor cores); "tf32x3" is Triton's 3-pass TF32 on tensor cores
(errors ~1e-6 relative to the summed terms, near fp32's ~1e-7; interpret mode
runs it as IEEE, the CPU has no TF32); "bf16x3" splits both operands into bf16
hi + lo and sums 3 bf16 dots, dropping lo x lo (errors ~1e-5 relative to the
summed terms, the same in interpret mode). bf16 inputs always use bf16 dots.
Hardware knobs (block rows, warps, pipeline stages, D chunk) are keywords of
``forward``/``backward``; ``sweep_configs()`` lists the accelerator sweep.

Lowering without a GPU (tests, AOT): JAX >= 0.11 needs a target GPU; wrap the
``.lower(lowering_platforms=("cuda",))`` call in ``abstract_gpu()``.
"""
import contextlib
import dataclasses
import functools
import warnings
from typing import NamedTuple

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
PRECISIONS = ("highest", "tf32x3", "bf16x3")   # float32 dots, see the docstring
_X_TILE_BYTES = 32 * 1024           # one x tile (block rows x D chunk)
_ACC_FLOATS = 16 * 1024             # f32 elements of one head tile's accumulator
_REGS_PER_THREAD = 128              # 32-bit registers for f32 state (limit 255)
_SMEM_BYTES = 160 * 1024            # shared memory per program (A100 163K, H100 227K)
_MIN_DIM_CHUNK = 64                 # narrowest D chunk
_MIN_CHUNK = 256                    # fewest rows of x per split-L chunk
_NUM_SMS = 132                      # H100/H200 SXM; split-L sizing without a GPU
DEFAULT_GPU = "NVIDIA H100 80GB HBM3"
# The accelerator check's sweep (sweep_configs): block rows x warps x stages.
SWEEP = dict(block_l=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3, 4))


class BudgetError(ValueError):
  """No tiling of a shape fits the register / shared-memory budgets."""


class Config(NamedTuple):
  block_l: int      # rows of x per loop step
  head_tile: int    # heads per program
  dim_p: int        # D padded to a power of two
  heads_p: int      # H padded to a power of two (>= 16)
  num_warps: int
  num_stages: int
  dim_chunk: int    # D columns accumulated per program (divides dim_p)


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


def _check_knobs(num_warps, num_stages, dim_chunk, dp):
  for name, v, low in (("num_warps", num_warps, 1), ("dim_chunk", dim_chunk, 16)):
    if v is not None and (not isinstance(v, int) or v < low or v & (v - 1)):
      raise ValueError(f"{name} must be a power of two >= {low} or None, got {v!r}")
  if num_stages is not None and (not isinstance(num_stages, int) or num_stages < 1):
    raise ValueError(f"num_stages must be a positive int or None, got {num_stages!r}")
  if dim_chunk is not None and dim_chunk > dp:
    raise ValueError(f"dim_chunk must be <= the padded D = {dp}, got {dim_chunk}")


def budget_bytes(kernel, cfg, itemsize):
  """(register bytes, shared-memory bytes) one program of ``kernel`` ("forward"
  or "backward") needs under ``cfg`` (estimates, see the module docstring)."""
  bl, ht, dc = cfg.block_l, cfg.head_tile, cfg.dim_chunk
  nh = cfg.heads_p // ht
  if kernel == "forward":   # acc; s, p and a temporary | x ring, q, p
    regs = 4 * (ht * dc + 3 * ht * bl)
    smem = itemsize * (cfg.num_stages * bl * dc + ht * dc + ht * bl)
  else:   # dq per head tile, dx; s, g.x, p, ds per tile | x ring, q, g, p, ds
    regs = 4 * (nh * ht * dc + bl * dc + 4 * nh * ht * bl)
    smem = itemsize * (cfg.num_stages * bl * dc + 2 * ht * dc + 2 * ht * bl)
  return regs, smem


def budget_limits(num_warps):
  """(register bytes, shared-memory bytes) a program may use."""
  return num_warps * 32 * _REGS_PER_THREAD * 4, _SMEM_BYTES


def config(seq_len, dim, heads, itemsize, block_l=None, *, num_warps=None,
           num_stages=None, dim_chunk=None, kernel="forward"):
  """Static tiling for a shape and kernel ("forward" or "backward"): the widest
  D chunk whose tiles fit the budgets. None knobs are picked per shape; given
  ones are kept. Raises BudgetError when no D chunk fits."""
  dp = max(16, pl.next_power_of_2(dim))
  hp = max(16, pl.next_power_of_2(heads))
  _check_knobs(num_warps, num_stages, dim_chunk, dp)
  stages = 2 if num_stages is None else num_stages
  ht = HEAD_TILES[0]   # from the whole of D, so D chunks never merge head tiles
  for h in HEAD_TILES:
    if h <= hp and h * dp <= _ACC_FLOATS:
      ht = h
  chunks = [dim_chunk] if dim_chunk else [
      dp >> i for i in range(dp.bit_length()) if dp >> i >= min(dp, _MIN_DIM_CHUNK)]
  for dc in chunks:   # widest D chunk first, then the most rows, then warps
    bl = block_l
    if bl is None:
      bl = BLOCK_CHOICES[0]
      for b in BLOCK_CHOICES:
        if b * dc * itemsize <= _X_TILE_BYTES:
          bl = b
      while bl > BLOCK_CHOICES[0] and bl // 2 >= seq_len:
        bl //= 2
    rows = [bl] if block_l else [bl >> i for i in range(4) if bl >> i >= 16]
    for bl in rows:
      for warps in [num_warps] if num_warps else sorted({4 if dc * ht <= 4096 else 8, 8}):
        cfg = Config(bl, ht, dp, hp, warps, stages, dc)
        need, limit = budget_bytes(kernel, cfg, itemsize), budget_limits(warps)
        if need[0] <= limit[0] and need[1] <= limit[1]:
          return cfg
  raise BudgetError(
      f"pallas_gpu {kernel}: no D chunk of D={dim} (padded {dp}) with H={heads}, "
      f"itemsize {itemsize}, block_l={block_l}, num_warps={num_warps}, "
      f"num_stages={num_stages} fits {_REGS_PER_THREAD} registers per thread and "
      f"{_SMEM_BYTES >> 10} KiB of shared memory; use implementation='xla'")


def fits(seq_len, dim, heads, itemsize, **knobs):
  """Whether both kernels have a tiling inside the budgets (else BudgetError)."""
  try:
    for kernel in ("forward", "backward"):
      config(seq_len, dim, heads, itemsize, kernel=kernel, **knobs)
  except BudgetError:
    return False
  return True


def sweep_configs():
  """Knob settings for the accelerator sweep, as keyword dicts for forward /
  backward: block rows x warps x pipeline stages (18 settings)."""
  return [dict(block_l=b, num_warps=w, num_stages=s) for b in SWEEP["block_l"]
          for w in SWEEP["num_warps"] for s in SWEEP["num_stages"]]


def num_splits(batch, segments, programs_per_range, seq_len, block_l, sms=None):
  """Split-L factor: enough programs to fill the GPU, each chunk at least
  _MIN_CHUNK rows and 4 blocks (partials then cost little next to x)."""
  programs = batch * segments * programs_per_range
  want = max(1, (2 * (sms or _sm_count()) + programs - 1) // programs)
  most = max(1, seq_len // max(4 * block_l, _MIN_CHUNK))
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


def _split_bf16(a):
  hi = a.astype(jnp.bfloat16)
  return hi, (a - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _dot(a, b, precision, trans_a=False, trans_b=False):
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  dot = functools.partial(lax.dot_general, dimension_numbers=dims,
                          preferred_element_type=jnp.float32)
  if a.dtype != jnp.float32:
    return dot(a, b)
  if precision == "bf16x3":   # small terms first; lo x lo (~2^-16 relative) dropped
    (a_hi, a_lo), (b_hi, b_lo) = _split_bf16(a), _split_bf16(b)
    return dot(a_lo, b_hi) + dot(a_hi, b_lo) + dot(a_hi, b_hi)
  if precision == "tf32x3":
    return dot(a, b, precision=lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  return dot(a, b, precision=lax.Precision.HIGHEST)


def _load_rows(x_ref, row0, c_en, block_l, col0, width, dim):
  """x[row0 : row0 + block_l, col0 : col0 + width] as a tile; rows >= c_en and
  columns >= dim read as 0. Returns the tile and the (block_l,) row mask."""
  rmask = row0 + jnp.arange(block_l) < c_en
  cmask = col0 + jnp.arange(width) < dim
  x = pltriton.load(x_ref.at[pl.ds(row0, block_l), pl.ds(col0, width)],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
  return x, rmask


def _all_d_dot(x_ref, weights, row0, c_en, block_l, dc, dim, precision):
  """ref[heads] @ x[rows].T over all of D for each (ref, heads slice) in
  ``weights``, as a loop over D chunks of width dc; a tuple of (heads, block_l)."""
  nd = x_ref.shape[-1] // dc

  def step(j, accs):
    col0 = pl.multiple_of(j * dc, dc)
    x, _ = _load_rows(x_ref, row0, c_en, block_l, col0, dc, dim)
    return tuple(a + _dot(ref[hs, pl.ds(col0, dc)].astype(x.dtype), x, precision,
                          trans_b=True) for a, (ref, hs) in zip(accs, weights))

  init = tuple(jnp.zeros((hs.size, block_l), jnp.float32) for _, hs in weights)
  return lax.fori_loop(0, nd, step, init)


def _fwd_kernel(starts_ref, ends_ref, q_ref, x_ref, out_ref, lse_ref, *,
                block_l, splits, dim, heads, dim_chunk, precision):
  td, kc = pl.program_id(0), pl.program_id(2)
  ht, dp = q_ref.shape
  nd = dp // dim_chunk
  t, d = td // nd, td % nd
  k, c = kc // splits, kc % splits
  col0 = pl.multiple_of(d * dim_chunk, dim_chunk) if nd > 1 else 0
  c_st, c_en, nblk = _chunk(starts_ref[k], ends_ref[k], c, splits, block_l)
  q = q_ref[...] if nd == 1 else None                             # (Ht, Dp)

  def body(i, carry):
    acc, m, l = carry
    row0 = c_st + i * block_l
    x, rmask = _load_rows(x_ref, row0, c_en, block_l, col0, dim_chunk, dim)
    if nd == 1:
      s = _dot(q, x, precision, trans_b=True)
    else:   # scores need all of D; this program accumulates columns [col0, +dc)
      (s,) = _all_d_dot(x_ref, [(q_ref, pl.ds(0, ht))], row0, c_en, block_l,
                        dim_chunk, dim, precision)
    s = jnp.where(rmask[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(x.dtype), x, precision)
    return acc, m_new, l

  init = (jnp.zeros((ht, dim_chunk), jnp.float32),
          jnp.full((ht,), -jnp.inf, jnp.float32), jnp.zeros((ht,), jnp.float32))
  acc, m, l = lax.fori_loop(0, nblk, body, init)
  nonempty = l > 0
  safe = jnp.where(nonempty, l, 1.0)
  # Only the H x D part exists in HBM: padded heads and columns are not stored;
  # lse is stored by the first D chunk (every chunk computes the same).
  hmask = t * ht + jnp.arange(ht) < heads
  cmask = col0 + jnp.arange(dim_chunk) < dim
  pltriton.store(out_ref, jnp.where(nonempty[:, None], acc / safe[:, None], 0.0),
                 mask=hmask[:, None] & cmask[None, :])
  pltriton.store(lse_ref, jnp.where(nonempty, m + jnp.log(safe), -jnp.inf),
                 mask=hmask & (d == 0))


def _pad_queries(queries, hp, dp, dtype):
  H, D = queries.shape
  return jnp.pad(queries, ((0, hp - H), (0, dp - D))).astype(dtype)


def _require(precision):
  if not AVAILABLE:
    raise NotImplementedError("this JAX has no Pallas Triton backend; use "
                              "implementation='xla'")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _params(cfg):
  return _Params(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(x, queries, starts, ends, *, block_l=None, interpret=False, sms=None,
            num_warps=None, num_stages=None, dim_chunk=None, precision="highest"):
  """Pallas GPU forward. x (B, L, D); queries (H, D) float32 (temperature folded);
  starts/ends (B, S) int32. Returns out (B, S, H, D) float32, lse (B, S, H) f32.
  block_l, num_warps, num_stages, dim_chunk: tiling knobs (None: per shape);
  precision: float32 dots, one of PRECISIONS; sms: SMs to fill (split-L)."""
  _require(precision)
  B, L, D = x.shape
  H, S = queries.shape[0], starts.shape[1]
  if S == 0:
    return jnp.zeros((B, 0, H, D), jnp.float32), jnp.zeros((B, 0, H), jnp.float32)
  cfg = config(L, D, H, x.dtype.itemsize, block_l, num_warps=num_warps,
               num_stages=num_stages, dim_chunk=dim_chunk)
  ht, dc = cfg.head_tile, cfg.dim_chunk
  nh, nd = cfg.heads_p // ht, cfg.dim_p // dc
  ns = num_splits(B, S, nh * nd, L, cfg.block_l, sms)
  kernel = functools.partial(
      _fwd_kernel, block_l=cfg.block_l, splits=ns, dim=D, heads=H, dim_chunk=dc,
      precision="highest" if interpret and precision == "tf32x3" else precision)
  out, lse = pl.pallas_call(
      kernel,
      grid=(nh * nd, B, S * ns),
      in_specs=[
          pl.BlockSpec((None, S), lambda td, b, kc: (b, 0)),
          pl.BlockSpec((None, S), lambda td, b, kc: (b, 0)),
          pl.BlockSpec((ht, cfg.dim_p), lambda td, b, kc: (td // nd, 0)),
          pl.BlockSpec((None, L, cfg.dim_p), lambda td, b, kc: (b, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, ht, dc),
                       lambda td, b, kc: (b, kc // ns, kc % ns, td // nd, td % nd)),
          pl.BlockSpec((None, None, None, ht),
                       lambda td, b, kc: (b, kc // ns, kc % ns, td // nd)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, S, ns, H, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, S, ns, H), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=bool(interpret),
      name="attention_pool_fwd_gpu",
  )(starts, ends, _pad_queries(queries, cfg.heads_p, cfg.dim_p, x.dtype), x)
  return _merge_splits(out, lse)


def _merge_splits(out, lse):
  """(B, S, n, H, D), (B, S, n, H) chunk results -> one softmax per range."""
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
                dx_ref, dq_ref, *, block_l, splits, dim, head_tile, heads,
                dim_chunk, precision):
  d, kc = pl.program_id(0), pl.program_id(2)
  k, c = kc // splits, kc % splits
  nd = q_ref.shape[1] // dim_chunk
  col0 = pl.multiple_of(d * dim_chunk, dim_chunk) if nd > 1 else 0
  cols = pl.ds(col0, dim_chunk)
  c_st, c_en, nblk = _chunk(starts_ref[k], ends_ref[k], c, splits, block_l)
  cmask = col0 + jnp.arange(dim_chunk) < dim
  tiles = [pl.ds(t * head_tile, head_tile)
           for t in range(q_ref.shape[0] // head_tile)]           # static

  def body(i, dqs):
    # Every head tile's dx for this row block is summed in registers and stored
    # once: no program (and no thread) ever reads dx back.
    row0 = c_st + i * block_l
    x, rmask = _load_rows(x_ref, row0, c_en, block_l, col0, dim_chunk, dim)
    if nd == 1:
      s_gx = [_dot(ref[hs, :].astype(x.dtype), x, precision, trans_b=True)
              for hs in tiles for ref in (q_ref, g_ref)]
    else:   # s and g.x need all of D; dx and dq are this program's columns
      s_gx = _all_d_dot(x_ref, [(ref, hs) for hs in tiles for ref in (q_ref, g_ref)],
                        row0, c_en, block_l, dim_chunk, dim, precision)
    dx, new = 0.0, []
    for n, (hs, dq) in enumerate(zip(tiles, dqs)):
      s, gx = s_gx[2 * n], s_gx[2 * n + 1]                        # (Ht, bl)
      p = jnp.where(rmask[None, :], jnp.exp(s - lse_ref[hs][:, None]), 0.0)
      ds = (p * (gx - delta_ref[hs][:, None])).astype(x.dtype)
      p = p.astype(x.dtype)
      new.append(dq + _dot(ds, x, precision))
      dx = dx + _dot(p, g_ref[hs, cols].astype(x.dtype), precision, trans_a=True) + _dot(
          ds, q_ref[hs, cols], precision, trans_a=True)
    pltriton.store(dx_ref.at[pl.ds(row0, block_l), cols], dx.astype(dx_ref.dtype),
                   mask=rmask[:, None] & cmask[None, :])
    return tuple(new)

  zeros = tuple(jnp.zeros((head_tile, dim_chunk), jnp.float32) for _ in tiles)
  dqs = lax.fori_loop(0, nblk, body, zeros)
  for t, (hs, dq) in enumerate(zip(tiles, dqs)):   # only the H x D part exists
    hmask = t * head_tile + jnp.arange(head_tile) < heads
    pltriton.store(dq_ref.at[hs, :], dq, mask=hmask[:, None] & cmask[None, :])

  # dx on the row's trailing padding [end of last range, L) is zeroed by all
  # S x splits programs of the row (and D chunk), each its own slice of it.
  length = x_ref.shape[0]
  pad0 = ends_ref[ends_ref.shape[0] - 1]
  n_prog = pl.num_programs(2)
  per = ((length - pad0 + n_prog - 1) // n_prog + block_l - 1) // block_l * block_l
  p_st = pad0 + kc * per
  p_en = jnp.minimum(p_st + per, length)

  def zero(i, carry):
    row0 = p_st + i * block_l
    rmask = (row0 + jnp.arange(block_l)) < p_en
    pltriton.store(dx_ref.at[pl.ds(row0, block_l), cols],
                   jnp.zeros((block_l, dim_chunk), dx_ref.dtype),
                   mask=rmask[:, None] & cmask[None, :])
    return carry

  lax.fori_loop(0, jnp.maximum(p_en - p_st + block_l - 1, 0) // block_l, zero, 0)


def backward(x, queries, starts, ends, lse, g, delta, *, block_l=None,
             interpret=False, sms=None, num_warps=None, num_stages=None,
             dim_chunk=None, precision="highest"):
  """Pallas GPU backward. g (B, S, H, D) cotangent of out; lse, delta (B, S, H),
  delta = sum_d g * out. Returns dx (B, L, D) in x.dtype, dqueries (H, D) f32.
  Knobs as in ``forward`` (the backward picks its own D chunk)."""
  _require(precision)
  B, L, D = x.shape
  H, S = queries.shape[0], starts.shape[1]
  if S == 0:   # nothing pooled: no program would run
    return jnp.zeros_like(x), jnp.zeros((H, D), jnp.float32)
  cfg = config(L, D, H, x.dtype.itemsize, block_l, num_warps=num_warps,
               num_stages=num_stages, dim_chunk=dim_chunk, kernel="backward")
  hp, dp, dc = cfg.heads_p, cfg.dim_p, cfg.dim_chunk
  nd = dp // dc
  ns = num_splits(B, S, nd, L, cfg.block_l, sms)
  pad_h = ((0, 0), (0, 0), (0, hp - H))
  lse = jnp.pad(jnp.where(jnp.isfinite(lse), lse, 0.0), pad_h)
  kernel = functools.partial(
      _bwd_kernel, block_l=cfg.block_l, splits=ns, dim=D, head_tile=cfg.head_tile,
      heads=H, dim_chunk=dc,
      precision="highest" if interpret and precision == "tf32x3" else precision)
  row = lambda d, b, kc: (b, 0)
  per_range = lambda d, b, kc: (b, kc // ns, 0)
  dx, dq = pl.pallas_call(
      kernel,
      grid=(nd, B, S * ns),
      in_specs=[
          pl.BlockSpec((None, S), row),
          pl.BlockSpec((None, S), row),
          pl.BlockSpec((hp, dp), lambda d, b, kc: (0, 0)),
          pl.BlockSpec((None, L, dp), lambda d, b, kc: (b, 0, 0)),
          pl.BlockSpec((None, None, hp, dp), lambda d, b, kc: (b, kc // ns, 0, 0)),
          pl.BlockSpec((None, None, hp), per_range),
          pl.BlockSpec((None, None, hp), per_range),
      ],
      out_specs=[
          pl.BlockSpec((None, L, dp), lambda d, b, kc: (b, 0, 0)),
          pl.BlockSpec((None, None, None, hp, dc),
                       lambda d, b, kc: (b, kc // ns, kc % ns, 0, d)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, L, D), x.dtype),
                 jax.ShapeDtypeStruct((B, S, ns, H, D), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=bool(interpret),
      name="attention_pool_bwd_gpu",
  )(starts, ends, _pad_queries(queries, hp, dp, x.dtype), x,
    jnp.pad(g.astype(jnp.float32), ((0, 0), (0, 0), (0, hp - H), (0, dp - D))),
    lse, jnp.pad(delta.astype(jnp.float32), pad_h))
  return dx, dq.sum(axis=(0, 1, 2))

"""Mosaic GPU (Hopper) forward kernel for attention pooling over ranges.

Backend: ``jax.experimental.pallas.mosaic_gpu`` (``plgpu.kernel``), the GPU
backend upstream keeps while Triton is deprecated. bf16 inputs only: float32
stays on XLA or the Triton kernel (wgmma has no IEEE fp32 path). Forward only;
the API pairs it with the XLA autodiff backward (``backward="xla"``).

One program (CUDA block, one warpgroup) per range (row b, segment s) pools all
of its rows for every head, with an online softmax over blocks of BLOCK_L rows:
  * x blocks (BLOCK_L, D) arrive by TMA into a ring of ``stages`` SMEM slots,
    each with its own barrier; the copy of block i + stages is issued as soon as
    block i is consumed. TMA moves whole 8-row tiles, so blocks start at the
    range start rounded down to 8; TMA zero-fills rows past L.
  * scores^T (BLOCK_L, Hp) = x_blk @ q^T on wgmma: the transposed orientation,
    so the few heads are the N dimension (Hp = H padded to 16, 32 or 64) and the
    rows are the M = 64 dimension.
  * rows outside [start, end) get -inf scores; a partial block also has those x
    rows zeroed in SMEM (padding may hold NaN, and 0 * NaN = NaN).
  * out^T (D, Hp) += x_blk^T @ p^T on wgmma (A = the x slot read transposed,
    B = p^T stored to SMEM in bf16), accumulated in place in float32 registers.
wgmma needs one swizzle for both operands and p^T is Hp bf16 wide, so every SMEM
tile is (8, Hp) with a 2 * Hp byte swizzle (32 bytes for H <= 16).
Empty ranges give zeros (lse -inf). Results leave through SMEM by TMA, in 64-row
chunks of out^T; XLA transposes them to (B, S, H, D).

Limits (clear errors from ``config``): bf16; D a multiple of 64 (D = 600 is
refused: use the Triton kernel or XLA); H <= 64; the f32 accumulator within
MAX_ACC_FLOATS (D x Hp <= 16384: D <= 1024 for H <= 16, D <= 512 for H <= 32);
the x ring plus the query tile within SMEM_BYTES (one slot is 64 x D bf16).
L not a multiple of 8 (or under 64) costs one padded copy of x. No split-L: the
B x S programs must fill the GPU on their own (slow for B = 1 and long L).

Lowering needs no GPU: ``jax.export.export(jax.jit(f), platforms=["cuda"])``
works on a CPU on JAX 0.10.2 and 0.12. Interpret mode (``interpret=True``) runs
the Mosaic GPU interpreter (SMEM, TMA, barriers and wgmma simulated on the CPU)
on JAX 0.12 only; on 0.10.2 it raises NotImplementedError (see can_interpret).
Not checked without a GPU: ptxas, register allocation (spills at D x Hp near
the limit), the SMEM budget, speed.
"""
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
  AVAILABLE = hasattr(plgpu, "kernel") and hasattr(plgpu, "wgmma")
except ImportError:  # a JAX without Mosaic GPU
  plgpu = None
  AVAILABLE = False

BLOCK_L = 64                     # rows per step: the wgmma M of the score matmul
DIM_MULTIPLE = 64                # D tile (128-byte swizzle of bf16)
ROW_TILE = 8                     # rows of x per TMA / SMEM tile
MAX_HEADS = 64                   # wgmma N of both matmuls, one instruction
MAX_STAGES = 4
MAX_ACC_FLOATS = 16 * 1024      # out^T accumulator: 128 f32 registers per thread
SMEM_BYTES = 220 * 1024          # usable per block on H100/H200 (227 KiB max)
DTYPES = (jnp.bfloat16,)


def _kernel_fn(body, out_type, scratch_types, **kw):
  """plgpu.kernel with out_type/scratch_types on every JAX (0.10 also takes the
  deprecated out_shape/scratch_shapes; older releases take only those)."""
  params = inspect.signature(plgpu.kernel).parameters
  if "out_type" in params:
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, **kw)
  return plgpu.kernel(body, out_shape=out_type, scratch_shapes=scratch_types, **kw)


def can_interpret():
  """Whether this JAX's Mosaic GPU interpreter runs this kernel on a CPU. JAX
  0.12 exports plgpu.InterpretGPUParams and interprets every primitive used
  here; 0.10.2 ships an internal interpreter with no rules for pl.run_state,
  plgpu.layout_cast or transposed wgmma operands, so this kernel cannot run on it."""
  if plgpu is None or not hasattr(plgpu, "InterpretGPUParams"):
    return False
  try:
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
  except ImportError:
    return False
  return any(hasattr(v, "_interpret_run_state_p") for v in vars(jaxpr_interpret).values()
             if isinstance(v, type))


def interpret_params():
  """Params for the Mosaic GPU interpreter (CPU runs); NotImplementedError where
  it cannot run this kernel (see can_interpret)."""
  if not can_interpret():
    raise NotImplementedError(
        f"the Mosaic GPU interpreter of JAX {jax.__version__} cannot run the "
        "mosaic_gpu attention-pool kernel (no interpreter rules for pl.run_state, "
        "plgpu.layout_cast or transposed wgmma operands; JAX 0.12 has them); on a "
        "CPU use implementation='pallas_gpu' with interpret=True, or 'xla'")
  return plgpu.InterpretGPUParams()


def heads_padded(heads):
  return max(16, pl.next_power_of_2(heads))


def smem_bytes(dim, heads, stages):
  """SMEM one program uses: the x ring, the query tile, p^T, an out chunk, lse."""
  hp = heads_padded(heads)
  return (2 * (stages * BLOCK_L * dim + hp * dim + BLOCK_L * hp)
          + 4 * (DIM_MULTIPLE * hp + hp))


def config(dim, heads, dtype, stages=None):
  """Pipeline stages for a shape; ValueError (naming the limit) when it cannot run."""
  if not AVAILABLE:
    raise NotImplementedError("this JAX has no Pallas Mosaic GPU backend "
                              "(jax.experimental.pallas.mosaic_gpu); use "
                              "implementation='pallas_gpu' or 'xla'")
  if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
    raise TypeError(f"mosaic_gpu supports x of dtype bfloat16 only (wgmma), got "
                    f"{jnp.dtype(dtype).name}; use implementation='pallas_gpu' or "
                    f"'xla' for float32")
  if dim % DIM_MULTIPLE or dim == 0:
    raise ValueError(f"mosaic_gpu needs D to be a positive multiple of "
                     f"{DIM_MULTIPLE} (TMA / swizzle tiles), got D={dim}; use "
                     f"implementation='pallas_gpu' or 'xla'")
  if heads > MAX_HEADS:
    raise ValueError(f"mosaic_gpu supports at most {MAX_HEADS} heads (one wgmma "
                     f"N tile), got H={heads}; use implementation='pallas_gpu'")
  if dim * heads_padded(heads) > MAX_ACC_FLOATS:
    raise ValueError(f"mosaic_gpu keeps the (D, Hp) float32 accumulator in registers; "
                     f"D={dim} x Hp={heads_padded(heads)} (H={heads}) is over its "
                     f"{MAX_ACC_FLOATS} elements; use implementation='pallas_gpu'")
  if stages is not None:
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
      raise ValueError(f"stages must be a positive int or None, got {stages!r}")
    fit = [stages] if smem_bytes(dim, heads, stages) <= SMEM_BYTES else []
  else:
    fit = [s for s in range(MAX_STAGES, 0, -1) if smem_bytes(dim, heads, s) <= SMEM_BYTES]
  if not fit:
    s = stages or 1
    raise ValueError(f"mosaic_gpu: {s} x D={dim} bf16 x block(s) plus the queries need "
                     f"{smem_bytes(dim, heads, s) >> 10} KiB of shared memory, over its "
                     f"{SMEM_BYTES >> 10} KiB; use implementation='pallas_gpu'")
  return fit[0]


def _fwd_body(starts_ref, ends_ref, x_ref, q_ref, out_ref, lse_ref, scratch, *,
              num_segments, stages):
  x_smem, q_smem, p_smem, o_smem, l_smem, x_bar, q_bar = scratch
  hp, dim = q_ref.shape
  bl = BLOCK_L
  r = lax.axis_index("r")
  b = r // num_segments
  st, en = starts_ref[r], ends_ref[r]
  # TMA moves whole 8-row tiles of x: blocks start at st rounded down to 8 (the
  # rows before st are masked like the rows after the end).
  a0 = st // ROW_TILE * ROW_TILE
  nblk = jnp.where(en > st, (en - a0 + bl - 1) // bl, 0)
  wgmma_layout = plgpu.Layout.WGMMA

  def fetch(i):
    plgpu.copy_gmem_to_smem(x_ref.at[b, pl.ds(a0 + i * bl, bl)], x_smem.at[i % stages],
                            x_bar.at[i % stages])

  plgpu.copy_gmem_to_smem(q_ref, q_smem, q_bar.at[0])
  for i in range(stages):
    pl.when(i < nblk)(functools.partial(fetch, i))
  plgpu.barrier_wait(q_bar.at[0])

  def step(i, carry):
    acc, m, l = carry
    slot = i % stages
    xs = x_smem.at[slot]
    plgpu.barrier_wait(x_bar.at[slot])
    row0 = a0 + i * bl

    def valid(rows):
      return (rows + row0 >= st) & (rows + row0 < en)

    @pl.when((row0 < st) | (row0 + bl > en))
    def _zero_outside():   # rows outside the range: 0 (padding may be NaN)
      for c in range(dim // DIM_MULTIPLE):
        chunk = xs.at[:, pl.ds(c * DIM_MULTIPLE, DIM_MULTIPLE)]
        rows = plgpu.broadcasted_iota(jnp.int32, (bl, DIM_MULTIPLE), 0, layout=wgmma_layout)
        v = chunk[...]
        chunk[...] = jnp.where(valid(rows), v, jnp.zeros_like(v))
      plgpu.commit_smem()

    def scores(acc_ref):
      plgpu.wgmma(acc_ref, xs, q_smem.transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(scores, plgpu.ACC((bl, hp), jnp.float32))   # (bl, Hp)
    rows = plgpu.broadcasted_iota(jnp.int32, (bl, hp), 0, layout=wgmma_layout)
    s = jnp.where(valid(rows), s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=0))        # every block has a valid row
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
    l = l * alpha + p.sum(axis=0)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()

    def pool(acc_ref):
      plgpu.wgmma(acc_ref, xs.transpose((1, 0)), p_smem)

    acc = pl.run_state(pool)(plgpu.ACC.init(acc))   # in place, (D, Hp)
    pl.when(i + stages < nblk)(functools.partial(fetch, i + stages))
    return acc, m_new, l

  acc = plgpu.layout_cast(jnp.zeros((dim, hp), jnp.float32), wgmma_layout)
  m = plgpu.layout_cast(jnp.full((hp,), -jnp.inf, jnp.float32), wgmma_layout.reduce(0))
  l = plgpu.layout_cast(jnp.zeros((hp,), jnp.float32), wgmma_layout.reduce(0))
  acc, m, l = lax.fori_loop(0, nblk, step, (acc, m, l))
  nonempty = l > 0
  safe = jnp.where(nonempty, l, jnp.ones_like(l))
  out = jnp.where(lax.broadcast_in_dim(nonempty, acc.shape, [1]),
                  acc / lax.broadcast_in_dim(safe, acc.shape, [1]), jnp.zeros_like(acc))
  l_smem[...] = jnp.where(nonempty, m + jnp.log(safe), jnp.full_like(m, -jnp.inf))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(l_smem, lse_ref.at[r])
  for c in range(dim // DIM_MULTIPLE):
    rows = pl.ds(c * DIM_MULTIPLE, DIM_MULTIPLE)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # o_smem free again
    o_smem[...] = out[c * DIM_MULTIPLE:(c + 1) * DIM_MULTIPLE]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[r, rows])
  plgpu.wait_smem_to_gmem(0)


def forward(x, queries, starts, ends, *, block_l=None, interpret=False, stages=None):
  """Mosaic GPU forward. x (B, L, D) bfloat16; queries (H, D) float32
  (temperature folded; fed to wgmma as bf16, like the Triton kernel);
  starts/ends (B, S) int32. Returns out (B, S, H, D) float32 and lse (B, S, H).
  block_l must be None or BLOCK_L; stages: x ring slots (None: most that fit).
  interpret: True (or an InterpretGPUParams) runs the Mosaic GPU interpreter."""
  B, L, D = x.shape
  H, S = queries.shape[0], starts.shape[1]
  stages = config(D, H, x.dtype, stages)
  if block_l not in (None, BLOCK_L):
    raise ValueError(f"block_l for mosaic_gpu must be {BLOCK_L} (the wgmma M "
                     f"dimension), got {block_l}")
  if B * S == 0:
    return jnp.zeros((B, S, H, D), jnp.float32), jnp.zeros((B, S, H), jnp.float32)
  if L % ROW_TILE or L < BLOCK_L:   # TMA needs whole 8-row tiles and one block
    x = jnp.pad(x, ((0, 0), (0, max(BLOCK_L, L + -L % ROW_TILE) - L), (0, 0)))
  hp = heads_padded(H)
  q = jnp.pad(queries, ((0, hp - H), (0, 0))).astype(x.dtype)
  # wgmma wants one swizzle for both operands; p^T is (BLOCK_L, Hp), so every
  # tile is Hp bf16 wide (32-, 64- or 128-byte swizzle).
  swizzled = (plgpu.TilingTransform((ROW_TILE, hp)), plgpu.SwizzleTransform(2 * hp))
  scratch = [
      plgpu.SMEM((stages, BLOCK_L, D), x.dtype, transforms=swizzled),
      plgpu.SMEM((hp, D), x.dtype, transforms=swizzled),
      plgpu.SMEM((BLOCK_L, hp), x.dtype, transforms=swizzled),
      plgpu.SMEM((DIM_MULTIPLE, hp), jnp.float32),
      plgpu.SMEM((hp,), jnp.float32),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=1),
  ]
  kw = {}
  if isinstance(interpret, str):
    raise ValueError(f"interpret for mosaic_gpu must be a bool or an InterpretGPUParams "
                     f"(the Mosaic GPU interpreter), got {interpret!r}")
  if interpret:
    kw["interpret"] = interpret_params() if interpret is True else interpret

  def body(starts_ref, ends_ref, x_ref, q_ref, out_ref, lse_ref, *scratch_refs):
    _fwd_body(starts_ref, ends_ref, x_ref, q_ref, out_ref, lse_ref, scratch_refs,
              num_segments=S, stages=stages)

  out, lse = _kernel_fn(
      body,
      out_type=(jax.ShapeDtypeStruct((B * S, D, hp), jnp.float32),
                jax.ShapeDtypeStruct((B * S, hp), jnp.float32)),
      scratch_types=scratch,
      grid=(B * S,), grid_names=("r",), **kw,
  )(starts.reshape(-1).astype(jnp.int32), ends.reshape(-1).astype(jnp.int32), x, q)
  out = out.reshape(B, S, D, hp)[..., :H].transpose(0, 1, 3, 2)
  return out, lse.reshape(B, S, hp)[..., :H]

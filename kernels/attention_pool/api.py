"""Public attention-pooling function: validation, query folding and dispatch."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import reference, vjp

IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "mosaic_gpu")
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
# Smallest accepted temperature: the smallest normal float32. Below it 1/t is not
# finite in float32 (1e-45 is a subnormal) and the scores would be inf or NaN.
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


def attention_pool(x, queries, *, lengths=None, segment_ids=None, num_segments=None,
                   key_weight=None, value_weight=None, value_bias=None,
                   temperature=1.0, implementation="auto", interpret=False,
                   block_l=None, backward="kernel"):
  """Softmax attention pooling of a (padded or packed) sequence by H queries.

  ``scores[h, l] = x[l] . q[h] / temperature`` over the valid positions,
  ``out[h] = sum_l softmax_l(scores[h]) x[l]``, then the optional value projection
  ``out[h] @ value_weight[:, h] + value_bias[h]``. Accumulation is float32.
  Rows with no valid position return zeros (never NaN).

  Args:
    x: (B, L, D) float32 or bfloat16 (float16/float64 on the XLA path).
    queries: (H, D) folded queries; or (H, K) when ``key_weight`` is given.
    lengths: optional (B,) int, valid prefix length per row (0..L). Output (B, H, Dv).
    segment_ids: optional (B, L) int for packed rows: ids non-decreasing along L, so
      each segment is one contiguous run; negative ids mark trailing padding.
      Every segment is pooled separately. Output (B, S, H, Dv).
    num_segments: S, static. Defaults to max(segment_ids) + 1 when the ids are
      concrete; required under jit.
    key_weight: optional (D, H, K) key projection folded into the queries,
      ``q[h] = key_weight[:, h] @ queries[h]`` (a key bias cancels in the softmax).
    value_weight, value_bias: optional (D, H, Dv) and (H, Dv) value projection,
      applied after pooling (exact, since the weights sum to 1); value_bias
      needs value_weight.
    temperature: scalar (python number or array, differentiable), at least
      MIN_TEMPERATURE (the smallest normal float32) and small enough that
      queries / temperature stays finite; inf gives mean pooling.
    implementation: "auto" (Pallas on TPU/GPU, XLA elsewhere; on GPU the Triton
      kernel), "xla", "pallas_tpu", "pallas_gpu" (Pallas Triton) or
      "mosaic_gpu" (Pallas Mosaic GPU, Hopper: bf16 x only, D a multiple of 64,
      H <= 64, forward kernel only; see mosaic_gpu.py).
    interpret: run the Pallas kernel in interpret mode (CPU testing): True (for
      pallas_tpu the TPU interpreter, pltpu.InterpretParams(); for mosaic_gpu
      the Mosaic GPU interpreter, JAX >= 0.12 only), "hlo" (the generic
      interpreter; use it inside shard_map over simulated devices; not for
      mosaic_gpu), or an InterpretParams object.
    block_l: rows of x per kernel step, a positive int; default picked per shape
      and backend. pallas_gpu: a power of two >= 16; pallas_tpu: a multiple of
      128; mosaic_gpu: 64 only. Ignored by "xla".
    backward: "kernel" (Pallas backward) or "xla" (autodiff of the reference).
      mosaic_gpu has no backward kernel: its gradient is always the XLA
      autodiff backward (both values mean that).

  Returns:
    (B, H, Dv) without segment_ids, (B, S, H, Dv) with them; dtype of x.
    Dv = D, or value_weight.shape[-1]. L = 0 (every row empty) gives zeros.

  Checks: shapes, dtypes and block_l are checked eagerly, always. Values (lengths
  in [0, L], sorted segment ids, ids < num_segments, the temperature) are checked
  when they are concrete; under jit they cannot be, and then lengths are clipped
  to [0, L], ids >= num_segments are ignored, unsorted ids give unspecified
  results, and a temperature that is not >= MIN_TEMPERATURE (0, negative, NaN) or
  that makes queries / temperature overflow gives an all-NaN output, the same on
  every implementation.
  """
  impl = _resolve(implementation, x, queries, num_segments, segment_ids, block_l)
  q, bad_temperature = _fold_queries(x, queries, key_weight, temperature)
  if value_bias is not None and value_weight is None:
    raise ValueError("value_bias needs value_weight (the bias belongs to the value "
                     "projection); pass value_weight or drop value_bias")
  B, L, D = x.shape
  if segment_ids is not None:
    if lengths is not None:
      raise ValueError("pass either lengths or segment_ids, not both")
    num_segments = _check_segments(segment_ids, num_segments, B, L)
    starts, ends = reference.ranges_from_segments(segment_ids, num_segments)
  else:
    if lengths is None:
      lengths = jnp.full((B,), L, jnp.int32)
    _check_lengths(lengths, B, L)
    starts, ends = reference.ranges_from_lengths(lengths, L)

  pool = _pool_fn(impl, interpret, block_l, backward)
  if B == 0 or L == 0:   # nothing to pool: every row is empty
    out = jnp.zeros(starts.shape + q.shape, jnp.float32)
  else:
    out = pool(x, q, starts, ends)                               # (B, S, H, D) f32
  if value_weight is not None:
    out = _project(out, value_weight, value_bias, ends > starts, q.shape[0], D)
  if bad_temperature is not None:
    out = jnp.where(bad_temperature, jnp.nan, out)
  out = out.astype(x.dtype)
  return out if segment_ids is not None else out[:, 0]


def _pool_fn(impl, interpret, block_l, backward):
  if impl == "xla":
    return lambda x, q, s, e: reference.pool_ranges(x, q, s, e)[0]
  if backward not in ("kernel", "xla"):
    raise ValueError(f"backward must be 'kernel' or 'xla', got {backward!r}")
  if impl == "mosaic_gpu":   # forward kernel; the backward is XLA autodiff
    from . import mosaic_gpu
    fwd = functools.partial(mosaic_gpu.forward, block_l=block_l, interpret=interpret)
    if isinstance(interpret, bool):
      return vjp.make_pool(fwd, vjp.reference_backward)
    return vjp.make_pool.__wrapped__(fwd, vjp.reference_backward)
  if impl == "pallas_tpu":
    from . import pallas_tpu as mod
  else:
    from . import pallas_gpu as mod
  if not isinstance(interpret, bool):  # InterpretParams objects are not hashable
    return _pool_uncached(mod, interpret, block_l, backward)
  fwd = functools.partial(mod.forward, block_l=block_l, interpret=interpret)
  if backward == "kernel":
    bwd = functools.partial(mod.backward, block_l=block_l, interpret=interpret)
  elif backward == "xla":
    bwd = vjp.reference_backward
  else:
    raise ValueError(f"backward must be 'kernel' or 'xla', got {backward!r}")
  return vjp.make_pool(fwd, bwd)


def _pool_uncached(mod, interpret, block_l, backward):
  fwd = functools.partial(mod.forward, block_l=block_l, interpret=interpret)
  bwd = (functools.partial(mod.backward, block_l=block_l, interpret=interpret)
         if backward == "kernel" else vjp.reference_backward)
  return vjp.make_pool.__wrapped__(fwd, bwd)


def _resolve(implementation, x, queries, num_segments, segment_ids, block_l):
  """Shape/dtype/block checks on x and queries; returns the implementation."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if block_l is not None and (isinstance(block_l, bool) or
                              not isinstance(block_l, (int, np.integer)) or
                              block_l <= 0):
    raise ValueError(f"block_l must be a positive int (rows of x per kernel step) "
                     f"or None, got {block_l!r}")
  if getattr(x, "ndim", None) != 3:
    raise ValueError(f"x must have shape (B, L, D), got {getattr(x, 'shape', x)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a float array (float32 or bfloat16), got {x.dtype}")
  if getattr(queries, "ndim", None) != 2:
    raise ValueError(f"queries must have shape (H, D) or (H, K), "
                     f"got {getattr(queries, 'shape', queries)}")
  if not jnp.issubdtype(queries.dtype, jnp.floating):
    raise TypeError(f"queries must be a float array, got {queries.dtype}")
  if implementation == "auto":
    backend = jax.default_backend()
    implementation = {"tpu": "pallas_tpu", "gpu": "pallas_gpu",
                      "cuda": "pallas_gpu"}.get(backend, "xla")
    if implementation == "pallas_gpu":
      from . import pallas_gpu
      if not pallas_gpu.AVAILABLE:
        implementation = "xla"
    if implementation != "xla" and (x.dtype not in KERNEL_DTYPES or
                                    _tpu_state_too_big(implementation, x, queries,
                                                       num_segments, segment_ids, block_l)):
      implementation = "xla"
    if implementation == "pallas_gpu" and not _gpu_fits(x, queries, block_l):
      warnings.warn(f"attention_pool: no pallas_gpu tiling of L={x.shape[1]}, D={x.shape[2]}, "
                    f"H={queries.shape[0]} ({x.dtype}) fits the register / shared-memory budgets; "
                    "using the XLA path", stacklevel=3)
      implementation = "xla"
  if implementation == "mosaic_gpu":   # bf16 only, its own shape limits
    from . import mosaic_gpu
    if block_l is not None:
      _check_block(implementation, block_l)
    mosaic_gpu.config(x.shape[2], queries.shape[0], x.dtype)
  if implementation != "xla":
    if x.dtype not in KERNEL_DTYPES:
      raise TypeError(f"{implementation} supports x of dtype float32 or bfloat16, "
                      f"got {x.dtype}; use implementation='xla'")
    if block_l is not None:
      _check_block(implementation, block_l)
    if _tpu_state_too_big(implementation, x, queries, num_segments, segment_ids,
                          block_l):
      from . import pallas_tpu
      s, bl, need = _tpu_vmem(x, queries, num_segments, segment_ids, block_l)
      raise ValueError(f"pallas_tpu keeps (S, H, D) float32 accumulators in VMEM; "
                       f"S * H * D = {s * queries.shape[0] * x.shape[2]} (S={s}, "
                       f"H={queries.shape[0]}, D={x.shape[2]}) needs about "
                       f"{need / 2**20:.1f} MiB at block_l={bl}, too large for its "
                       f"{pallas_tpu.VMEM_BUDGET >> 20} MiB budget, use "
                       f"implementation='xla' (or a smaller block_l)")
    if implementation == "pallas_gpu":
      from . import pallas_gpu
      for kernel in ("forward", "backward"):  # a BudgetError (ValueError) now, not at the gradient
        pallas_gpu.config(x.shape[1], x.shape[2], queries.shape[0], x.dtype.itemsize, block_l,
                          kernel=kernel)
  return implementation


def _gpu_fits(x, queries, block_l):
  from . import pallas_gpu
  return pallas_gpu.fits(x.shape[1], x.shape[2], queries.shape[0], x.dtype.itemsize, block_l=block_l)


def _tpu_vmem(x, queries, num_segments, segment_ids, block_l):
  """(S, block_l, bytes): the VMEM estimate pallas_tpu budgets and asks for."""
  from . import pallas_tpu
  s = num_segments or (1 if segment_ids is None else x.shape[1])
  H, D, n = queries.shape[0], x.shape[2], x.dtype.itemsize
  bl = block_l or pallas_tpu.default_block(x.shape[1], s, H, D, n)
  return s, bl, pallas_tpu.vmem_bytes(bl, s, H, D, n)


def _check_block(impl, block_l):
  if impl == "mosaic_gpu" and block_l != 64:
    raise ValueError(f"block_l for mosaic_gpu must be 64 (the wgmma M dimension), "
                     f"got {block_l}")
  if impl == "pallas_gpu" and (block_l < 16 or block_l & (block_l - 1)):
    raise ValueError(f"block_l for pallas_gpu must be a power of two >= 16 (Triton "
                     f"tiles), got {block_l}")
  if impl == "pallas_tpu" and block_l % 128:
    raise ValueError(f"block_l for pallas_tpu must be a multiple of 128 (TPU lane "
                     f"tiling), got {block_l}")


def _tpu_state_too_big(impl, x, queries, num_segments, segment_ids, block_l):
  if impl != "pallas_tpu":
    return False
  from . import pallas_tpu
  return _tpu_vmem(x, queries, num_segments, segment_ids, block_l)[2] > \
      pallas_tpu.VMEM_BUDGET


def _fold_queries(x, queries, key_weight, temperature):
  """(H, D) float32 queries with the key projection and temperature folded in,
  and None, or under jit a traced bool that is True for a bad temperature."""
  D = x.shape[2]
  q = queries.astype(jnp.float32)
  if key_weight is not None:
    H, K = queries.shape
    if key_weight.shape != (D, H, K):
      raise ValueError(f"key_weight must have shape (D, H, K) = {(D, H, K)} for x "
                       f"{x.shape} and queries {queries.shape}, got {key_weight.shape}")
    q = jnp.einsum("dhk,hk->hd", key_weight.astype(jnp.float32), q,
                   precision=jax.lax.Precision.HIGHEST)
  elif queries.shape[1] != D:
    raise ValueError(f"queries must have shape (H, D) with D = {D} (last dim of x "
                     f"{x.shape}), got {queries.shape}")
  t = jnp.asarray(temperature)
  if t.ndim != 0:
    raise ValueError(f"temperature must be a scalar, got shape {t.shape}")
  if _concrete(t):
    value = float(np.asarray(temperature))   # before a float32 cast flushes it to 0
    if not value >= MIN_TEMPERATURE:
      raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.4g} (the smallest "
                       f"normal float32; 1/temperature must be finite), got {value:.4g}")
  t = t.astype(jnp.float32)
  if _concrete(t):
    q, bad = q / t, False
    if _concrete(q):
      if not bool(jnp.isfinite(q).all()):
        raise ValueError(f"queries / temperature must be finite in float32; got "
                         f"temperature {float(t):.4g} with max |queries| "
                         f"{float(jnp.abs(queries.astype(jnp.float32)).max()):.4g}")
      return q, None
  else:
    bad = ~(t >= MIN_TEMPERATURE)
    q = q / jnp.where(bad, 1.0, t)
  # Traced: no error is possible. A bad temperature or non-finite folded queries
  # give NaN on every path (the kernels get finite queries, so no backend's
  # NaN/inf handling is involved).
  bad = bad | ~jnp.isfinite(q).all()
  return jnp.where(bad, 0.0, q), bad


def _project(out, value_weight, value_bias, nonempty, H, D):
  if value_weight.ndim != 3 or value_weight.shape[:2] != (D, H):
    raise ValueError(f"value_weight must have shape (D, H, Dv) with D={D}, H={H}, "
                     f"got {value_weight.shape}")
  out = jnp.einsum("bshd,dhk->bshk", out, value_weight.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  if value_bias is not None:
    if value_bias.shape != value_weight.shape[1:]:
      raise ValueError(f"value_bias must have shape (H, Dv) = {value_weight.shape[1:]}"
                       f", got {value_bias.shape}")
    out = out + value_bias.astype(jnp.float32)
  return jnp.where(nonempty[:, :, None, None], out, 0.0)


def _concrete(a):
  return not isinstance(a, jax.core.Tracer)


def _check_lengths(lengths, B, L):
  if getattr(lengths, "shape", None) != (B,):
    raise ValueError(f"lengths must have shape (B,) = ({B},), "
                     f"got {getattr(lengths, 'shape', lengths)}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"lengths must be an integer array, got {lengths.dtype}")
  if _concrete(lengths):
    v = np.asarray(lengths)
    bad = np.flatnonzero((v < 0) | (v > L))
    if bad.size:
      i = int(bad[0])
      raise ValueError(f"lengths must be in [0, L={L}], got lengths[{i}] = {v[i]}")


def _check_segments(segment_ids, num_segments, B, L):
  """Checks segment ids; returns num_segments (inferred when None and concrete)."""
  if getattr(segment_ids, "shape", None) != (B, L):
    raise ValueError(f"segment_ids must have shape (B, L) = ({B}, {L}), "
                     f"got {getattr(segment_ids, 'shape', segment_ids)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(f"segment_ids must be an integer array, got {segment_ids.dtype}")
  if not _concrete(segment_ids):
    if num_segments is None:
      raise ValueError("num_segments must be given when segment_ids are traced "
                       "(under jit the output shape cannot depend on their values)")
    return int(num_segments)
  ids = np.asarray(segment_ids)
  for b in range(B):
    row = ids[b]
    pad = np.flatnonzero(row < 0)
    if pad.size and pad[0] + pad.size != L:
      raise ValueError(f"segment_ids[{b}]: padding (negative ids) must be trailing, "
                       f"found a valid id at position {pad[0] + np.argmax(row[pad[0]:] >= 0)}"
                       f" after padding at {pad[0]}")
    valid = row[row >= 0]
    down = np.flatnonzero(np.diff(valid) < 0)
    if down.size:
      i = int(down[0]) + 1
      raise ValueError(f"segment_ids[{b}] must be non-decreasing along L so each "
                       f"segment is one contiguous run (packed, sorted segments are "
                       f"supported); got id {valid[i]} after id {valid[i - 1]} at "
                       f"position {i}")
  top = int(ids.max(initial=-1)) + 1
  if num_segments is None:
    return max(top, 1)
  if top > num_segments:
    raise ValueError(f"segment_ids contain id {top - 1} >= num_segments = {num_segments}")
  return int(num_segments)

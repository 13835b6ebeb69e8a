"""The Mosaic TPU kernel's budgets and paths, checked without a TPU: VMEM estimate
vs every buffer Pallas allocates, the limit both kernels ask for, the API's
admission, SMEM batch chunking, the masked / unmasked block paths with NaN
padding, the three-matmul backward, and TPU lowering of the risky shapes.

Numerics run in the TPU interpreter with NaN-filled memory (an unwritten output
element fails the comparison) against float64."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attention_pool_cases import GRAD_TOL, TOL, make_inputs
from jaxemb.kernels import attention_pool
from jaxemb.kernels.attention_pool import api, pallas_tpu, reference

POISON = pltpu.InterpretParams(uninitialized_memory="nan")
SDS = jax.ShapeDtypeStruct


# --- jaxpr helpers -----------------------------------------------------------

def _pallas_calls(fn, *args):
  """The pallas_call equations of fn's jaxpr, in order."""
  eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  return [e for e in eqns if e.primitive.name == "pallas_call"]


def _walk(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (cond, loops)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)      # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          yield from _walk(inner)


def _tile_bytes(shape, dtype):
  """Bytes of an array in (8 or 16, 128) VMEM tiles, computed independently."""
  shape = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  n = jnp.dtype(dtype).itemsize
  rows = math.ceil(shape[-2] / (32 // n)) * (32 // n)
  return math.prod(shape[:-2]) * rows * math.ceil(shape[-1] / 128) * 128 * n


def _allocated(eqn):
  """VMEM Pallas allocates for a pallas_call: blocked operands twice (double
  buffering), scratch once; SMEM tables and unblocked (ANY) operands not at all."""
  gm = eqn.params["grid_mapping"]
  refs = [v.aval for v in eqn.params["jaxpr"].invars]
  scratch = len(refs) - gm.num_scratch_operands
  total = 0
  for i, r in enumerate(refs):
    space = str(getattr(r, "memory_space", ""))
    if "smem" in space.lower() or "any" in space.lower():
      continue
    total += _tile_bytes(r.shape, r.dtype) * (1 if i >= scratch else 2)
  return total


def _kernels(B, L, D, H, S, dtype, block_l):
  x, q = SDS((B, L, D), dtype), SDS((H, D), jnp.float32)
  r, c = SDS((B, S), jnp.int32), SDS((B, S, H), jnp.float32)
  fwd = _pallas_calls(functools.partial(pallas_tpu.forward, block_l=block_l),
                      x, q, r, r)
  bwd = _pallas_calls(functools.partial(pallas_tpu.backward, block_l=block_l),
                      x, q, r, r, c, SDS((B, S, H, D), jnp.float32), c)
  return fwd, bwd


# --- VMEM (item 8) -----------------------------------------------------------

@pytest.mark.parametrize("B,L,D,H,S,dtype,block_l", [
    (2, 300, 72, 3, 1, jnp.bfloat16, 128), (1, 5000, 600, 16, 4, jnp.float32, 512),
    (2, 4096, 1024, 8, 1, jnp.bfloat16, 1024), (1, 700, 128, 1, 8, jnp.bfloat16, 256)])
def test_vmem_estimate_covers_every_buffer_and_both_kernels_ask_for_it(
    B, L, D, H, S, dtype, block_l):
  n = jnp.dtype(dtype).itemsize
  est = pallas_tpu.vmem_bytes(block_l, S, H, D, n)
  want_limit = max(est + pallas_tpu._VMEM_HEADROOM, 16 * 2**20)
  fwd, bwd = _kernels(B, L, D, H, S, dtype, block_l)
  assert len(fwd) == len(bwd) == 1
  for eqn in fwd + bwd:
    # the estimate adds the temporaries to what Pallas allocates: strictly more
    assert _allocated(eqn) < est, eqn.params["name"]
    assert eqn.params["compiler_params"].vmem_limit_bytes == want_limit


def test_api_admits_exactly_what_the_estimate_fits(monkeypatch):
  """On a TPU, "auto" runs the kernel while vmem_bytes fits VMEM_BUDGET at some
  block (stepping the default block down first) and the XLA path past that; an
  explicit pallas_tpu past it is refused with the numbers."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  L, D, H = 4096, 1024, 16
  x, q = jnp.zeros((1, L, D), jnp.bfloat16), jnp.zeros((H, D))
  ids = jnp.zeros((1, L), jnp.int32)
  over = lambda bl: next(s for s in range(1, 500) if
                         pallas_tpu.vmem_bytes(bl, s, H, D, 2) > pallas_tpu.VMEM_BUDGET)
  resolve = lambda impl, s, bl=None: api._resolve(impl, x, q, s, ids, bl)
  S = over(1024)                  # the default block no longer fits, smaller ones do
  assert pallas_tpu.default_block(L, S, H, D, 2) == 512
  assert resolve("auto", S) == resolve("pallas_tpu", S) == "pallas_tpu"
  with pytest.raises(ValueError, match=rf"S={S}, H={H}, D={D}\) needs about .* MiB at "
                                       rf"block_l=1024, too large for its 24 MiB"):
    resolve("pallas_tpu", S, 1024)
  S = over(128)                   # no block fits
  assert resolve("auto", S - 1) == "pallas_tpu"
  assert resolve("auto", S) == "xla"
  with pytest.raises(ValueError, match="block_l=128, too large for its 24 MiB"):
    resolve("pallas_tpu", S)


def test_sweep_blocks_lists_the_fitting_choices():
  """The accelerator check's knob: block rows that fit, largest = the default."""
  # the (8, 4096, 1024, 8) bf16 preset: every choice, the default the largest
  assert pallas_tpu.sweep_blocks(4096, 1, 8, 1024, 2) == (128, 256, 512, 1024)
  assert pallas_tpu.pick_block_l(4096, 1024, 2) == 1024
  assert pallas_tpu.sweep_blocks(100, 1, 8, 1024, 2) == (128,)   # never past L
  vmem = lambda b, s: pallas_tpu.vmem_bytes(b, s, 16, 1024, 2)
  S = next(s for s in range(1, 500) if vmem(1024, s) > pallas_tpu.VMEM_BUDGET)
  big = pallas_tpu.sweep_blocks(4096, S, 16, 1024, 2)     # large state: 1024 is out
  assert big == (128, 256, 512)
  assert all(vmem(b, S) <= pallas_tpu.VMEM_BUDGET for b in big)


# --- jaxpr structure (items 10, 11, 12) ----------------------------------------

@pytest.mark.parametrize("H", [1, 3, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_needs_three_matmuls_per_path(H, dtype):
  """Unmasked and masked paths each run [g; q] x^T, ds x and one [p; ds]^T [g; q]
  with 2 Hp contraction rows (the two dx passes stacked); forward: two each."""
  fwd, bwd = _kernels(2, 300, 72, H, 3, dtype, 128)
  dots = lambda eqn: [e for e in _walk(eqn.params["jaxpr"])
                      if e.primitive.name == "dot_general"]
  assert len(dots(fwd[0])) == 4
  bdots = dots(bwd[0])
  assert len(bdots) == 6
  hp = pallas_tpu.head_pad(H, jnp.dtype(dtype).itemsize)
  tn = [e for e in bdots if e.params["dimension_numbers"][0] == ((0,), (0,))]
  assert [e.invars[0].aval.shape for e in tn] == [(2 * hp, 128)] * 2


def test_masks_are_built_at_full_shape_and_selected_in_float32():
  """No bool broadcast (bl, 1) -> (bl, D) and no bf16 select in either kernel
  (both are Mosaic layout risks the export cannot check)."""
  for eqn in sum(_kernels(2, 300, 600, 3, 3, jnp.bfloat16, 128), []):
    for e in _walk(eqn.params["jaxpr"]):
      if e.primitive.name == "broadcast_in_dim":
        assert e.invars[0].aval.dtype != jnp.bool_, eqn.params["name"]
      if e.primitive.name == "select_n":
        assert e.outvars[0].aval.dtype != jnp.bfloat16, eqn.params["name"]


def _train_step(B, L, D, H, S, dtype, block_l):
  def loss(x, q, ids):
    out = attention_pool(x, q, segment_ids=ids, num_segments=S, block_l=block_l,
                         implementation="pallas_tpu")
    return jnp.sum(out.astype(jnp.float32) ** 2)

  args = (SDS((B, L, D), dtype), SDS((H, D), jnp.float32), SDS((B, L), jnp.int32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), args


@pytest.mark.parametrize("H,D,block_l", [(1, 72, 128), (3, 600, 512), (1, 600, 256),
                                         (3, 72, 1024)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_lowers_few_heads_and_unaligned_dims(H, D, block_l, dtype):
  """Fewer than 8 heads (transposed-LHS matmuls), D not a multiple of 128, bf16
  masks: forward and backward lower for TPU, each with its VMEM limit."""
  fn, args = _train_step(2, 2 * block_l + 44, D, H, 3, dtype, block_l)
  text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
  assert text.count("attention_pool_fwd_tpu") >= 1
  assert text.count("attention_pool_bwd_tpu") >= 1


# --- SMEM chunking (item 9) ----------------------------------------------------

def test_batch_chunks_fit_the_smem_budget(monkeypatch):
  assert pallas_tpu.batch_chunks(8, 32, 1) == [(0, 8)]
  # a large packed batch: its tables pass the budget, so it is split
  assert pallas_tpu.smem_bytes(4096, 16, 32) > pallas_tpu.SMEM_BUDGET
  chunks = pallas_tpu.batch_chunks(4096, 16, 32)
  assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == 4096
  assert all(a < z and pallas_tpu.smem_bytes(z - a, 16, 32) <= pallas_tpu.SMEM_BUDGET
             for a, z in chunks)
  assert all(z == a2 for (_, z), (a2, _) in zip(chunks, chunks[1:]))
  monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET", 100)
  with pytest.raises(ValueError, match=r"one batch row needs 524 bytes .*32 blocks of "
                                       r"x, 33 segments.* 100 byte SMEM budget"):
    pallas_tpu.batch_chunks(2, 32, 33)


def _ranges(c):
  if c["mode"] == "lengths":
    return reference.ranges_from_lengths(c["kw"]["lengths"], c["L"])
  return reference.ranges_from_segments(c["kw"]["segment_ids"], c["kw"]["num_segments"])


def _grads(c, interpret, **extra):
  """(out, dx, dq) of sum(out * cotangent) through attention_pool, one program."""
  w = jnp.asarray(c["cotangent"], jnp.float32)
  w = w[:, 0] if c["mode"] == "lengths" else w

  def run(x, q):
    out, vjp = jax.vjp(lambda x, q: attention_pool(
        x, q, implementation="pallas_tpu", interpret=interpret, **c["kw"],
        **extra).astype(jnp.float32), x, q)
    return (out, *vjp(w))

  return jax.jit(run)(c["x"], c["q"])


def _float64(c, x):
  """(out, dx, dq) in float64 from the XLA reference on the given (clean) x."""
  with jax.enable_x64(True):
    w = jnp.asarray(c["cotangent"], jnp.float64)
    w = w[:, 0] if c["mode"] == "lengths" else w
    x = jnp.asarray(np.asarray(x, np.float32), jnp.float64)
    q = jnp.asarray(c["q"], jnp.float64)
    def run(x, q):
      out, vjp = jax.vjp(lambda x, q: attention_pool(x, q, implementation="xla",
                                                     **c["kw"]), x, q)
      return (out, *vjp(w))

    return [np.asarray(a) for a in jax.jit(run)(x, q)]


def _close(actual, want, tol):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  assert np.isfinite(actual).all(), "NaN/inf in a kernel output"
  scale = max(1.0, float(np.abs(want).max(initial=0)))
  np.testing.assert_allclose(actual, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_batch_chunks_match_float64(monkeypatch):
  """With SMEM room for one row, each kernel runs once per row (dx written in place
  across calls) and still matches float64."""
  c = make_inputs(2, 200, 8, 3, "segments", "float32", 1.0, seed=21)
  nb = 2                                                    # 200 rows, 128-row blocks
  monkeypatch.setattr(pallas_tpu, "SMEM_BUDGET", pallas_tpu.smem_bytes(1, nb, 4))
  assert pallas_tpu.batch_chunks(2, nb, 4) == [(0, 1), (1, 2)]
  fwd, bwd = _kernels(2, 200, 8, 3, 4, jnp.float32, 128)
  assert len(fwd) == len(bwd) == 2
  got = _grads(c, "hlo", block_l=128)
  for g, w, tol in zip(got, _float64(c, c["x"]), (TOL, GRAD_TOL, GRAD_TOL)):
    _close(g, w, tol["float32"])


# --- full / partial blocks with NaN padding (item 11) --------------------------

@pytest.mark.parametrize("mode,dtype,H,interpret", [("lengths", "float32", 3, POISON),
                                                    ("segments", "bfloat16", 1, "hlo")])
def test_nan_padding_never_leaks(mode, dtype, H, interpret):
  """Rows past the valid positions hold NaN. Blocks one range covers whole take
  the unmasked path, the rest the masked one; out, dx and dq are finite and match
  float64, and dx is exactly zero on every padding row."""
  c = make_inputs(2, 200, 8, H, mode, dtype, 1.0, seed=5)
  if mode == "lengths":   # row 0: one full block; row 1: a full and a partial block
    c["kw"] = dict(lengths=jnp.array([128, 150], jnp.int32))
  else:                   # row 0: segment 0 covers block 0, then a boundary, padding
    ids = np.full((2, 200), -1, np.int32)
    ids[0, :140], ids[0, 140:170] = 0, 2
    ids[1, :60], ids[1, 60:61], ids[1, 61:190] = 0, 1, 3
    c["kw"] = dict(segment_ids=jnp.asarray(ids), num_segments=4)
  st, en = _ranges(c)
  valid = np.asarray(reference.range_mask(st, en, 200).any(1))          # (B, L)
  clean = c["x"]
  c["x"] = jnp.where(valid[..., None], c["x"], jnp.nan).astype(c["x"].dtype)
  out, dx, dq = _grads(c, interpret, block_l=128)
  want = _float64(c, clean)
  _close(out, want[0], TOL[dtype])
  _close(dx, want[1], GRAD_TOL[dtype])
  _close(dq, want[2], GRAD_TOL[dtype])
  assert not np.asarray(dx, np.float32)[~valid].any()

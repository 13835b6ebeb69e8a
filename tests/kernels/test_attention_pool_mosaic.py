"""The Mosaic GPU forward kernel (implementation="mosaic_gpu").

Lowering: exported for CUDA on this CPU (``jax.export``, no GPU) at the GPU bench
presets and edge shapes, on both supported JAX versions. This runs the Pallas and
Mosaic GPU lowering (layouts, TMA descriptors, wgmma operand checks); ptxas,
registers and speed need a GPU (benchmarks/accelerator_stages.py).

Numerics: the Mosaic GPU interpreter (plgpu.InterpretGPUParams, which simulates
SMEM, TMA, barriers and wgmma on the CPU) runs the kernel on JAX 0.12 against the
float64 reference. JAX 0.10.2's interpreter lacks rules this kernel needs
(pl.run_state, layout_cast, transposed wgmma operands): there the same tests
check that interpret=True fails with a clear NotImplementedError instead.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_pool_cases import TOL, np_pool, random_lengths, random_segments
from jaxemb.kernels import attention_pool, bench
from jaxemb.kernels.attention_pool import api, mosaic_gpu

SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def _export(B, L, D, H, S=0, **kw):
  """Exports the API forward for CUDA; returns the StableHLO text."""
  def f(x, q, ids_or_lengths):
    if S:
      return attention_pool(x, q, segment_ids=ids_or_lengths, num_segments=S,
                            implementation="mosaic_gpu", **kw)
    return attention_pool(x, q, lengths=ids_or_lengths, implementation="mosaic_gpu", **kw)

  args = (SDS((B, L, D), BF16), SDS((H, D), jnp.float32),
          SDS((B, L) if S else (B,), jnp.int32))
  return jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("shape", bench.PRESETS["gpu"], ids=str)
def test_lowers_for_cuda_at_the_gpu_presets(shape):
  text = _export(*shape)
  assert text.count("stablehlo.custom_call @mosaic_gpu_v2") == 1


@pytest.mark.parametrize("B,L,D,H,S", [
    (2, 300, 192, 5, 4),     # segments, D not a multiple of 128, L not of 8
    (3, 5, 64, 1, 0),        # L under one block (padded), one head
    (2, 1000, 256, 40, 3),   # 64 padded heads (128-byte swizzle)
    (1, 4096, 512, 32, 0),   # 32 padded heads (64-byte swizzle)
])
def test_lowers_for_cuda_at_edge_shapes(B, L, D, H, S):
  assert "mosaic_gpu_v2" in _export(B, L, D, H, S)


def test_stages_and_the_gradient_lower():
  """Every ring depth lowers, and jit(value_and_grad) lowers: the Mosaic forward
  plus the XLA autodiff backward (which needs no forward output: under plain grad
  XLA drops the kernel)."""
  for stages in range(1, mosaic_gpu.MAX_STAGES + 1):
    f = jax.jit(lambda x, q, s, e: mosaic_gpu.forward(x, q, s, e, stages=stages)[0])
    args = (SDS((2, 512, 256), BF16), SDS((8, 256), jnp.float32),
            SDS((2, 1), jnp.int32), SDS((2, 1), jnp.int32))
    assert "mosaic_gpu_v2" in jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
  assert mosaic_gpu.config(1024, 8, BF16) == 1 and mosaic_gpu.config(256, 8, BF16) == 4
  loss = lambda x, q, n: attention_pool(x, q, lengths=n, implementation="mosaic_gpu").astype(
      jnp.float32).sum()
  args = (SDS((2, 256, 128), BF16), SDS((4, 128), jnp.float32), SDS((2,), jnp.int32))
  text = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
                           platforms=["cuda"])(*args).mlir_module()
  assert text.count("stablehlo.custom_call @mosaic_gpu_v2") == 1


@pytest.mark.parametrize("x,q,kw,error,match", [
    ((2, 64, 128), (3, 128), dict(dtype=jnp.float32), TypeError, "bfloat16 only"),
    ((2, 64, 600), (3, 600), {}, ValueError, "multiple of 64 .*got D=600"),
    ((2, 64, 128), (65, 128), {}, ValueError, r"at most 64 heads .*got H=65"),
    ((2, 64, 1024), (20, 1024), {}, ValueError, "D=1024 x Hp=32 .*H=20"),
    ((2, 64, 128), (3, 128), dict(block_l=32), ValueError, "block_l for mosaic_gpu must be 64"),
    ((2, 64, 128), (3, 128), dict(interpret="hlo"), ValueError, "interpret for mosaic_gpu"),
    ((2, 64, 128), (3, 128), dict(backward="fast"), ValueError, "backward must be"),
])
def test_bad_input(x, q, kw, error, match):
  dtype = kw.pop("dtype", BF16)
  with pytest.raises(error, match=match):
    attention_pool(jnp.zeros(x, dtype), jnp.zeros(q), implementation="mosaic_gpu", **kw)


def test_shared_memory_and_stage_limits():
  with pytest.raises(ValueError, match="shared memory"):
    mosaic_gpu.config(1024, 8, BF16, stages=2)
  with pytest.raises(ValueError, match="stages must be a positive int"):
    mosaic_gpu.config(256, 8, BF16, stages=0)
  assert mosaic_gpu.smem_bytes(1024, 8, 1) <= mosaic_gpu.SMEM_BYTES


def test_auto_keeps_the_triton_kernel(monkeypatch):
  assert "mosaic_gpu" in api.IMPLEMENTATIONS
  x, q = jnp.zeros((2, 64, 128), BF16), jnp.zeros((3, 128))
  assert api._resolve("auto", x, q, None, None, None) == "xla"   # CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert api._resolve("auto", x, q, None, None, None) == "pallas_gpu"
  assert api._resolve("mosaic_gpu", x, q, None, None, None) == "mosaic_gpu"


# -- numerics in the Mosaic GPU interpreter (JAX 0.12) ----------------------------

def _run(x, q, kw, **knobs):
  return attention_pool(x, q, implementation="mosaic_gpu", interpret=True, **kw, **knobs)


def _check_or_refused(fn):
  """Runs fn() where the interpreter can run the kernel; elsewhere checks the
  clear refusal. Returns fn()'s result or None."""
  if mosaic_gpu.can_interpret():
    return fn()
  with pytest.raises(NotImplementedError, match="Mosaic GPU interpreter of JAX"):
    fn()
  return None


@pytest.mark.parametrize("B,L,D,H,stages", [(4, 150, 64, 3, None), (2, 300, 128, 40, 1),
                                            (3, 200, 192, 16, 3)])
def test_lengths_match_float64(B, L, D, H, stages):
  """Lengths 0, 1, odd and L; several blocks through rings of 1 to 4 slots."""
  rng = np.random.default_rng([B, L, D, H])
  x = jnp.asarray(rng.normal(size=(B, L, D)), BF16)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  lengths = random_lengths(rng, B, L)
  lengths[:4] = [0, 1, L // 2 | 1, L][:B]
  kw = dict(lengths=jnp.asarray(lengths))
  got = _check_or_refused(lambda: _run(x, q, kw))
  if got is None:
    return
  want = np_pool(x, q, lengths=lengths)[:, 0]
  np.testing.assert_allclose(np.asarray(got, np.float32), want, **TOL["bfloat16"])
  assert not np.asarray(got, np.float32)[lengths == 0].any()
  if stages is not None:   # the ring depth changes nothing
    st, en = jnp.zeros((B, 1), jnp.int32), jnp.asarray(lengths)[:, None]
    out, lse = mosaic_gpu.forward(x, q, st, en, interpret=True, stages=stages)
    np.testing.assert_allclose(np.asarray(out[:, 0]), want, **TOL["bfloat16"])
    assert np.isneginf(np.asarray(lse)[lengths == 0]).all()


def test_segments_with_nan_padding_match_float64():
  """Packed segments (starts not a multiple of 8, empty ones) with NaN in the
  padding: the rows outside each range are never pooled."""
  rng = np.random.default_rng(7)
  B, L, D, H, S = 3, 290, 128, 5, 4
  ids = random_segments(rng, B, L, S)
  x = rng.normal(size=(B, L, D))
  x[ids < 0] = np.nan
  x = jnp.asarray(x, BF16)
  q = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  kw = dict(segment_ids=jnp.asarray(ids), num_segments=S)
  got = _check_or_refused(lambda: _run(x, q, kw))
  if got is None:
    return
  want = np_pool(np.where(ids[..., None] < 0, 0, np.asarray(x, np.float32)), q,
                 segment_ids=ids, num_segments=S)
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, **TOL["bfloat16"])


def test_gradient_is_the_xla_backward():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 100, 64)), BF16)
  q = jnp.asarray(rng.normal(size=(4, 64)) / 8, jnp.float32)
  kw = dict(lengths=jnp.array([100, 37]))

  def grads(impl, **knobs):
    f = lambda x, q: attention_pool(x, q, implementation=impl, **kw, **knobs).astype(
        jnp.float32).sum()
    return jax.grad(f, argnums=(0, 1))(x, q)

  got = _check_or_refused(lambda: grads("mosaic_gpu", interpret=True))
  if got is None:
    return
  for a, b in zip(got, grads("xla")):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=6e-2, atol=6e-2)

"""Every block configuration the dispatchers can pick is lowered for TPU (Mosaic)
and CUDA (Triton), forward and backward, with no accelerator present. This runs
the Pallas-level checks (tiling, power-of-two shapes, supported ops); the backend
compilers proper (Mosaic passes, ptxas) still only run on the device. CUDA
lowering runs inside pallas_gpu.abstract_gpu(): JAX >= 0.11 needs an abstract GPU
device to lower the Triton kernels without a GPU."""
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest

from jaxemb.kernels import attention_pool
from jaxemb.kernels.attention_pool import pallas_gpu, pallas_tpu, vjp

SDS = jax.ShapeDtypeStruct
# JAX >= 0.11 warns on every Triton lowering (kept on purpose, see pallas_gpu.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
DTYPES = (jnp.float32, jnp.bfloat16)


def _train_step(impl, B, L, D, H, S, dtype, **kw):
  """jit(value_and_grad) of a pooling loss and its abstract arguments."""
  def loss(x, q, t, ids_or_lengths):
    if S:
      out = attention_pool(x, q, segment_ids=ids_or_lengths, num_segments=S,
                           temperature=t, implementation=impl, **kw)
    else:
      out = attention_pool(x, q, lengths=ids_or_lengths, temperature=t,
                           implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  args = (SDS((B, L, D), dtype), SDS((H, D), jnp.float32), SDS((), jnp.float32),
          SDS((B, L) if S else (B,), jnp.int32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), args


def _lower_cuda(fn, args):
  with pallas_gpu.abstract_gpu():
    return fn.trace(*args).lower(lowering_platforms=("cuda",))


def test_tpu_dispatcher_only_picks_listed_blocks():
  for L, D, dt in itertools.product((1, 100, 128, 300, 4096, 10**5),
                                    (8, 128, 1024, 8192), (2, 4)):
    assert pallas_tpu.pick_block_l(L, D, dt) in pallas_tpu.BLOCK_CHOICES


@pytest.mark.parametrize("block_l", pallas_tpu.BLOCK_CHOICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tpu_lowers_every_block(block_l, dtype):
  for B, L, D, H, S in [(2, 3 * block_l + 5, 256, 8, 0), (2, block_l - 3, 48, 64, 3),
                        (1, 1, 8, 1, 0)]:
    fn, args = _train_step("pallas_tpu", B, L, D, H, S, dtype, block_l=block_l)
    jax.export.export(fn, platforms=["tpu"])(*args)


def _gpu_configs():
  """Each distinct (forward, backward) config pair gpu.config can return, with a
  shape that selects it."""
  seen = {}
  for L, D, H, dt in itertools.product((1, 20, 40, 5000), (8, 40, 64, 100, 256, 512,
                                                          768, 1024, 2048, 4096),
                                       (1, 16, 20, 64, 128), DTYPES):
    cfg = tuple(tuple(pallas_gpu.config(L, D, H, jnp.dtype(dt).itemsize, kernel=k))
                for k in ("forward", "backward"))
    seen.setdefault(cfg, (L, D, H, dt))
  return sorted(seen.items(), key=str)


def test_gpu_dispatcher_only_picks_listed_tiles():
  for pair, _ in _gpu_configs():
    for bl, ht, dp, hp, warps, stages, dc in pair:
      assert bl in pallas_gpu.BLOCK_CHOICES and ht in pallas_gpu.HEAD_TILES
      assert dp & (dp - 1) == 0 and hp & (hp - 1) == 0 and hp % ht == 0
      assert dc & (dc - 1) == 0 and dp % dc == 0 and warps in (4, 8) and stages == 2


@pytest.mark.parametrize("cfg,shape", _gpu_configs(), ids=str)
def test_gpu_lowers_every_config(cfg, shape):
  L, D, H, dtype = shape
  # Segments mode; lengths mode is the same kernel with S = 1 (lowered below).
  fn, args = _train_step("pallas_gpu", 2, L, D, H, 3, dtype)
  text = _lower_cuda(fn, args).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2     # forward and backward kernels


def test_gpu_lowers_split_l():
  """Few programs -> split-L with the LSE merge (B x S small, L long)."""
  assert pallas_gpu.num_splits(1, 1, 1, 8192, 16) > 1
  fn, args = _train_step("pallas_gpu", 1, 8192, 128, 4, 0, jnp.bfloat16)
  _lower_cuda(fn, args)


def _kernel_forward(mod, B, L, D, H, block_l):
  """jit of the module-level forward with a given block (bypassing the API's
  block_l check) and its abstract arguments."""
  fn = jax.jit(lambda x, q, st, en: mod.forward(x, q, st, en, block_l=block_l)[0])
  return fn, (SDS((B, L, D), jnp.float32), SDS((H, D), jnp.float32),
              SDS((B, 1), jnp.int32), SDS((B, 1), jnp.int32))


def test_lowering_rejects_a_bad_block():
  """The check is real: a block that breaks the tiling rules fails here."""
  fn, args = _kernel_forward(pallas_tpu, 2, 300, 64, 4, block_l=100)
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    jax.export.export(fn, platforms=["tpu"])(*args)
  fn, args = _kernel_forward(pallas_gpu, 2, 300, 64, 4, block_l=100)
  with pytest.raises(Exception, match="power of 2"):
    _lower_cuda(fn, args)


@pytest.mark.parametrize("impl,block_l", [("pallas_tpu", 100), ("pallas_gpu", 100),
                                          ("pallas_gpu", 8)])
def test_api_refuses_blocks_that_cannot_lower(impl, block_l):
  """The API refuses such blocks up front, with the rule, before any lowering."""
  with pytest.raises(ValueError, match=f"block_l for {impl} must be"):
    attention_pool(jnp.zeros((2, 300, 64)), jnp.zeros((4, 64)), block_l=block_l,
                   implementation=impl)


def test_tpu_kernels_ask_for_the_vmem_they_need():
  """Large (S, H, D) state raises the scoped-VMEM limit above the 16 MiB default,
  and the lowered kernel carries it; state past the budget is refused."""
  assert pallas_tpu.fits_vmem(4096, 8, 16, 1024, 2)
  block = pallas_tpu.pick_block_l(4096, 1024, 2)
  limit = pallas_tpu.vmem_bytes(block, 8, 16, 1024, 2) + pallas_tpu._VMEM_HEADROOM
  assert 16 * 2**20 < limit <= 32 * 2**20
  fn, args = _train_step("pallas_tpu", 2, 4096, 1024, 16, 8, jnp.bfloat16)
  text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
  # forward and backward each carry the limit as their scoped VMEM size
  assert len(re.findall(rf"size\W+(22: )?{limit}\b", text)) == 2
  assert not pallas_tpu.fits_vmem(4096, 64, 64, 1024, 2)
  with pytest.raises(ValueError, match="too large for its 24 MiB budget"):
    attention_pool(jnp.zeros((1, 4096, 1024), jnp.bfloat16), jnp.zeros((64, 1024)),
                   segment_ids=jnp.zeros((1, 4096), jnp.int32), num_segments=64,
                   implementation="pallas_tpu")


def _gpu_kernels(B, L, D, H, S, dtype, **knobs):
  """jit(vjp) through pallas_gpu.forward/backward with knobs (not in the API yet)
  and its abstract arguments."""
  pool = vjp.make_pool(functools.partial(pallas_gpu.forward, **knobs),
                       functools.partial(pallas_gpu.backward, **knobs))
  fn = jax.jit(jax.grad(lambda x, q, st, en: pool(x, q, st, en).sum(), argnums=(0, 1)))
  return fn, (SDS((B, L, D), dtype), SDS((H, D), jnp.float32),
              SDS((B, S), jnp.int32), SDS((B, S), jnp.int32))


@pytest.mark.parametrize("D,dtype,H", [(1280, jnp.float32, 8), (600, jnp.float32, 20),
                                       (4096, jnp.bfloat16, 1)])
def test_gpu_budgeted_configs_lower(D, dtype, H):
  """Shapes whose whole D is over budget lower with D chunks (both kernels)."""
  itemsize = jnp.dtype(dtype).itemsize
  for kernel in ("forward", "backward"):
    cfg = pallas_gpu.config(4096, D, H, itemsize, kernel=kernel)
    assert cfg.dim_chunk < cfg.dim_p
  fn, args = _gpu_kernels(2, 4096, D, H, 3, dtype)
  assert _lower_cuda(fn, args).as_text().count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("knobs", [pallas_gpu.sweep_configs()[i] for i in (0, 8, 17)],
                         ids=str)
def test_gpu_sweep_knobs_lower_and_reach_the_kernel(knobs):
  """Sweep settings at the bf16 preset shape lower, and the launch carries them."""
  fn, args = _gpu_kernels(8, 4096, 1024, 8, 1, jnp.bfloat16, **knobs)
  text = _lower_cuda(fn, args).as_text()
  assert text.count(f"num_warps = {knobs['num_warps']} : i32") == 2
  assert text.count(f"num_stages = {knobs['num_stages']} : i32") == 2


def test_gpu_precision_reaches_triton(monkeypatch, capsys):
  """The printed Triton module (pallas_call debug=True): "tf32x3" dots are
  tt.dot inputPrecision = tf32x3, "bf16x3" is three bf16 dots per f32 dot,
  "highest" is IEEE (Triton's default, not printed)."""
  monkeypatch.setattr(pallas_gpu.pl, "pallas_call",
                      functools.partial(pallas_gpu.pl.pallas_call, debug=True))
  found = {}
  for precision in pallas_gpu.PRECISIONS:
    fn = jax.jit(lambda x, q, st, en: pallas_gpu.forward(x, q, st, en,
                                                         precision=precision)[0])
    _lower_cuda(fn, (SDS((2, 300, 64), jnp.float32), SDS((4, 64), jnp.float32),
                     SDS((2, 1), jnp.int32), SDS((2, 1), jnp.int32)))
    text = capsys.readouterr().out
    module = text[text.index("The Triton module"):]
    dots = re.findall(r"tt\.dot [^\n]*", module)
    types = {re.sub(r".*: tensor<\d+x\d+x(\w+)>.*", r"\1", d) for d in dots}
    found[precision] = (len(dots), sorted(types),
                        sorted(set(re.findall(r"inputPrecision = (\w+)", module))))
  assert found["highest"] == (2, ["f32"], [])
  assert found["tf32x3"] == (2, ["f32"], ["tf32x3"])
  assert found["bf16x3"][:2] == (6, ["bf16"])

"""Shared test inputs and the float64 numpy reference for attention pooling."""
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

# Max abs/rel error vs the float64 reference, per input dtype. bf16: the kernel
# feeds the matmuls bf16 operands (queries, probabilities) with f32 accumulation
# and returns bf16, so ~3 bf16 ulps on O(1) values; fp32 is exact-ish (f32 dots).
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=3e-2, atol=3e-2)}
GRAD_TOL = {"float32": dict(rtol=1e-4, atol=1e-4), "bfloat16": dict(rtol=6e-2, atol=6e-2)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def np_pool(x, q, *, lengths=None, segment_ids=None, num_segments=None,
            temperature=1.0):
  """float64 attention pooling straight from the definition. Returns (B, S, H, D)."""
  x = np.asarray(np.asarray(x, np.float32), np.float64)
  q = np.asarray(np.asarray(q, np.float32), np.float64) / temperature
  B, L, D = x.shape
  pos = np.arange(L)
  if segment_ids is None:
    masks = (pos[None, :] < np.asarray(lengths)[:, None])[:, None, :]
  else:
    ids = np.asarray(segment_ids)
    masks = ids[:, None, :] == np.arange(num_segments)[None, :, None]
  out = np.zeros((B, masks.shape[1], q.shape[0], D))
  for b in range(B):
    for k in range(masks.shape[1]):
      m = masks[b, k]
      if m.any():
        s = q @ x[b, m].T
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[b, k] = (p / p.sum(axis=1, keepdims=True)) @ x[b, m]
  return out


def random_segments(rng, B, L, max_segments):
  """(B, L) sorted ids with random sizes (some empty), trailing -1 padding."""
  ids = np.full((B, L), -1, np.int32)
  for b in range(B):
    n = int(rng.choice([0, L, rng.integers(0, L + 1)]))
    if n:
      cuts = np.sort(rng.integers(0, n + 1, size=max_segments - 1))
      sizes = np.diff(np.concatenate([[0], cuts, [n]]))
      ids[b, :n] = np.repeat(np.arange(max_segments), sizes)
  return ids


def random_lengths(rng, B, L):
  """(B,) lengths mixing 0, 1, L and random values (often not a block multiple)."""
  return np.array([rng.choice([0, 1, L, rng.integers(0, L + 1)]) for _ in range(B)],
                  np.int32)


@st.composite
def cases(draw, max_l=300, dims=(8, 40, 128), heads=(1, 3, 16, 64)):
  """A random problem: dict of numpy inputs plus the settings that made it."""
  c = dict(B=draw(st.integers(1, 3)), L=draw(st.integers(1, max_l)),
           D=draw(st.sampled_from(dims)), H=draw(st.sampled_from(heads)),
           mode=draw(st.sampled_from(["lengths", "segments"])),
           dtype=draw(st.sampled_from(sorted(DTYPES))),
           temperature=draw(st.sampled_from([1.0, 0.3, 2.5])),
           seed=draw(st.integers(0, 2**31 - 1)))
  return make_inputs(**c)


def make_inputs(B, L, D, H, mode, dtype, temperature, seed, max_segments=4):
  rng = np.random.default_rng(seed)
  c = dict(B=B, L=L, D=D, H=H, mode=mode, dtype=dtype, temperature=temperature,
           seed=seed)
  c["x"] = jnp.asarray(rng.normal(size=(B, L, D)), DTYPES[dtype])
  c["q"] = jnp.asarray(rng.normal(size=(H, D)) / np.sqrt(D), jnp.float32)
  if mode == "lengths":
    c["kw"] = dict(lengths=jnp.asarray(random_lengths(rng, B, L)))
  else:
    c["kw"] = dict(segment_ids=jnp.asarray(random_segments(rng, B, L, max_segments)),
                   num_segments=max_segments)
  c["cotangent"] = rng.normal(size=(B, max_segments if mode == "segments" else 1, H, D))
  return c


def expected(c):
  out = np_pool(c["x"], c["q"], temperature=c["temperature"], **c["kw"])
  return out if c["mode"] == "segments" else out[:, 0]

"""AttentionPooling: multi-head attention pooling with learned queries (MAP head).

Standard multi-head attention of H learned queries over a sequence,
``softmax(q_h . (x W_k,h + b_k,h) / sqrt(K)) (x W_v,h + b_v,h)``, computed without
ever building K or V: the key projection is folded into the queries (the key bias
cancels in the softmax) and the value projection is applied after pooling (the
weights sum to 1). The pooling itself is ``jaxemb.kernels.attention_pool`` (Pallas on
TPU/GPU, XLA on CPU). Params carry logical axis names ('embed', 'heads', 'kv',
'mlp') for the training core's sharding rules.

SimpleAttentionPooling is the plain single-query form (ppiseq and others).

Sharding: under an active mesh (``jax.set_mesh``) and flax logical-axis rules
(``nn.logical_axis_rules``), as the training core runs models, a Pallas kernel is
wrapped in ``jax.shard_map``: rows split along B over the mesh axes of the 'batch'
rule, heads over those of the 'heads' rule when they divide H (else every device
pools all heads), L and D whole. The XLA path is left to XLA's auto-partitioner,
which partitions plain jnp ops along whatever the model shards (length and embed
too) and fuses them with their neighbours; only the opaque Pallas call needs the
explicit split. Either way B must be divisible by the size of the batch axes.
Without a mesh, or on a 1-device mesh, the kernel is called directly.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxemb.kernels import attention_pool, attention_pool_sharded
from jaxemb.kernels.attention_pool.sharded import axis_size, kernel_implementation

BATCH, HEADS = "batch", "heads"  # logical axis names, as in nn/transformer.py


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class AttentionPooling(nn.Module):
  """Pools (B, L, D) to (B, F), or to (B, S, F) per packed segment.

  Attributes:
    num_heads: H learned queries (one per head).
    head_dim: K, per-head key/value width; default D // H. Ignored when
      project_kv is False (queries then live in D and values are x itself).
    project_kv: learn key and value projections (standard MHA pooling).
    out_features: width F of the output projection over the concatenated heads;
      None keeps the concatenation (F = H * K, or H * D without projections).
    mlp_dim: if set, big_vision's MAP head: LayerNorm + MLP(mlp_dim) residual.
    temperature: divides the scores; default sqrt(K) (sqrt(D) without projections).
    learn_temperature: learn log(temperature) (the TempScale knob).
    implementation, interpret: passed to ``jaxemb.kernels.attention_pool``.
  """
  num_heads: int = 1
  head_dim: int | None = None
  project_kv: bool = True
  out_features: int | None = None
  mlp_dim: int | None = None
  temperature: float | None = None
  learn_temperature: bool = False
  implementation: str = "auto"
  interpret: bool | str = False
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, lengths=None, segment_ids=None, num_segments=None):
    """x (B, L, D); lengths (B,) or segment_ids (B, L) as in attention_pool.

    Returns (B, F) with lengths (or neither), (B, S, F) with segment_ids.
    Rows with no valid position pool to zeros before the output projection.
    """
    B, L, D = x.shape
    H = self.num_heads
    K = (self.head_dim or D // H) if self.project_kv else D
    init = nn.initializers.lecun_normal()
    kw = dict(lengths=lengths, segment_ids=segment_ids, num_segments=num_segments)
    if self.project_kv:
      queries = _param(self, "query", nn.initializers.normal(1.0), (H, K),
                       ("heads", "kv"), self.param_dtype)
      kw.update(
          key_weight=_param(self, "key", init, (D, H, K), ("embed", "heads", "kv"),
                            self.param_dtype),
          value_weight=_param(self, "value", init, (D, H, K),
                              ("embed", "heads", "kv"), self.param_dtype),
          value_bias=_param(self, "value_bias", nn.initializers.zeros, (H, K),
                            ("heads", "kv"), self.param_dtype))
    else:
      queries = _param(self, "query", nn.initializers.normal(1.0 / math.sqrt(D)),
                       (H, D), ("heads", "embed"), self.param_dtype)
    t = self.temperature or math.sqrt(K)
    if self.learn_temperature:
      t = jnp.exp(self.param("log_temperature",
                             lambda _: jnp.array(math.log(t), jnp.float32)))
    pooled = pool(x, queries, temperature=t, implementation=self.implementation,
                  interpret=self.interpret, **kw)                 # (B, [S,] H, K)
    y = pooled.reshape(pooled.shape[:-2] + (H * K,))
    if self.out_features is not None:
      kernel = _param(self, "out", init, (H * K, self.out_features),
                      (None, "embed"), self.param_dtype)
      bias = _param(self, "out_bias", nn.initializers.zeros, (self.out_features,),
                    ("embed",), self.param_dtype)
      y = jnp.dot(y, kernel.astype(y.dtype)) + bias.astype(y.dtype)
    if self.mlp_dim is not None:
      h = nn.LayerNorm(name="norm")(y)
      h = nn.Dense(self.mlp_dim, name="mlp_in", kernel_init=nn.with_logical_partitioning(
          init, ("embed", "mlp")))(h)
      y = y + nn.Dense(y.shape[-1], name="mlp_out", kernel_init=nn.with_logical_partitioning(
          init, ("mlp", "embed")))(nn.gelu(h))
    return y


class SimpleAttentionPooling(nn.Module):
  """Single-query attention pooling, (B, L, D) -> (B, D), or (B, S, D) per segment.

  ``out = sum_l softmax_l(x[l] . w) x[l]`` over the valid positions: one learned
  score vector, no 1/sqrt(D) scaling, no key/value projections; ppiseq's
  ``AttentionPooling1D`` and the usual ``softmax(Linear(D, 1)(x))``-weighted sum.
  Rows (or segments) with no valid position pool to zeros, where a
  ``log(mask)`` reference gives NaN.

  Porting from PyTorch: the one parameter ``weight`` has shape (1, D), exactly
  ``torch.nn.Linear(D, 1).weight``; copy it as is (no transpose):
  ``params["weight"] = linear.weight`` (ppiseq: ``AttentionPooling1D.w_proj.weight``). A
  Linear bias (ppiseq's ``bias=True``) adds the same constant to every score and
  cancels in the softmax, so there is none; drop it. Init is PyTorch's Linear
  default, U(-1/sqrt(D), 1/sqrt(D)). Same as ``AttentionPooling(num_heads=1,
  project_kv=False, temperature=1.0)`` with ``query = weight``.
  """
  implementation: str = "auto"
  interpret: bool | str = False
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, lengths=None, segment_ids=None, num_segments=None):
    """x (B, L, D); lengths (B,) or segment_ids (B, L) as in attention_pool."""
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"x must have shape (B, L, D), got {getattr(x, 'shape', x)}")
    D = x.shape[-1]
    bound = 1.0 / math.sqrt(D)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    weight = _param(self, "weight", init, (1, D), (None, "embed"), self.param_dtype)
    out = pool(x, weight, lengths=lengths, segment_ids=segment_ids,
               num_segments=num_segments, temperature=1.0,
               implementation=self.implementation, interpret=self.interpret)
    return out[..., 0, :]


def pool(x, queries, *, implementation="auto", interpret=False, **kwargs):
  """``jaxemb.kernels.attention_pool`` placed on the active mesh and logical-axis rules
  (see the module docstring). Same arguments and result."""
  impl = kernel_implementation(implementation, x, queries,
                               segment_ids=kwargs.get("segment_ids"),
                               num_segments=kwargs.get("num_segments"),
                               block_l=kwargs.get("block_l"))
  mesh = jax.sharding.get_abstract_mesh()
  manual = set(getattr(mesh, "manual_axes", ()))
  if mesh.empty or math.prod(n for a, n in mesh.shape.items() if a not in manual) == 1:
    return attention_pool(x, queries, implementation=impl, interpret=interpret,
                          **kwargs)
  batch, heads = _mesh_axes(mesh, manual, queries.shape[0])
  size = axis_size(mesh, batch)
  if x.shape[0] % size:
    raise ValueError(f"batch size B={x.shape[0]} of x must be divisible by the {size} "
                     f"devices of mesh axes {batch} that the logical axis "
                     f"{BATCH!r} is sharded over (mesh {dict(mesh.shape)})")
  if impl == "xla":
    return attention_pool(x, queries, implementation=impl, interpret=interpret,
                          **kwargs)
  return attention_pool_sharded(x, queries, mesh=mesh, axis=batch, head_axis=heads,
                                implementation=impl, interpret=interpret, **kwargs)


def _mesh_axes(mesh, manual, num_heads):
  """Mesh axes (tuples, or None) of the batch and heads dims from the active rules,
  less the manual ones (inside an outer shard_map those are already split)."""
  spec = nn.logical_to_mesh_axes((BATCH, HEADS))

  def names(entry):
    entry = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    entry = tuple(a for a in entry if a not in manual)
    return entry or None

  batch, heads = names(spec[0]), names(spec[1])
  if heads is not None and num_heads % axis_size(mesh, heads):
    heads = None
  return batch, heads

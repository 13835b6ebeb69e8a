"""AttentionPooling: multi-head attention pooling with learned queries (MAP head).

Standard multi-head attention of H learned queries over a sequence,
``softmax(q_h . (x W_k,h + b_k,h) / sqrt(K)) (x W_v,h + b_v,h)``, computed without
ever building K or V: the key projection is folded into the queries (the key bias
cancels in the softmax) and the value projection is applied after pooling (the
weights sum to 1). The pooling itself is ``kernels.attention_pool`` (Pallas on
TPU/GPU, XLA on CPU). Params carry logical axis names ('embed', 'heads', 'kv',
'mlp') for the training core's sharding rules.
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from kernels import attention_pool


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
    implementation, interpret: passed to ``kernels.attention_pool``.
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
    pooled = attention_pool(x, queries, temperature=t,
                            implementation=self.implementation,
                            interpret=self.interpret, **kw)       # (B, [S,] H, K)
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

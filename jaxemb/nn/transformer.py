"""A decoder-only Transformer (pre-LN, causal) with a pluggable embedding module.

Parameters and activations carry logical axis names ('batch', 'length', 'embed', 'heads', 'kv', 'mlp',
'vocab') that the training core maps to mesh axes. Packed inputs: `segment_ids` (B, L) keep tokens from
attending across document boundaries (0 marks padding), and RoPE positions restart in each segment.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxemb.nn.embeddings import token_nll
from jaxemb.nn.positions import T5RelativeBias, apply_rope, rope_tables, segment_positions


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    position: str = "rope"  # 'rope' | 't5' | 'none'
    rel_buckets: int = 32
    rel_max_distance: int = 128
    remat: bool = False
    dtype: str = "float32"  # activation dtype inside the blocks
    # causal attention in this many query blocks, skipping the all-masked key tiles right of the diagonal;
    # 0 = auto (see query_block_count)
    query_blocks: int = 0

    def __post_init__(self):
        if self.position not in ("rope", "t5", "none"):
            raise ValueError(f"position={self.position!r}; expected 'rope', 't5' or 'none'")
        if self.query_blocks < 0:
            raise ValueError(f"query_blocks={self.query_blocks}; expected 0 (auto) or a positive count")


class DenseGeneral(nn.Module):
    """x (..., *in_dims) -> (..., *features) with a kernel of shape (*in_dims, *features) named `axes`."""
    features: tuple
    axes: tuple
    in_dims: int = 1

    @nn.compact
    def __call__(self, x):
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        in_shape = x.shape[-self.in_dims:]
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(self.in_dims)),
            out_axis=tuple(range(self.in_dims, self.in_dims + len(features))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), in_shape + features)
        # As one 2-D matmul: on CPU, XLA otherwise inserts costly transposes in the backward pass.
        fan_in, fan_out = math.prod(in_shape), math.prod(features)
        y = matmul(x.reshape(-1, fan_in), kernel.astype(x.dtype).reshape(fan_in, fan_out))
        return y.reshape(*x.shape[:-self.in_dims], *features)


def matmul(x, w):
    """x (M, K) @ w (K, N). On CPU, when N is a multiple of 2048, through `_matmul_cpu_wide`, whose
    weight gradient runs on a transposed copy of x."""
    if jax.default_backend() == "cpu" and w.shape[1] % 2048 == 0:
        return _matmul_cpu_wide(x, w)
    return x @ w


@jax.custom_vjp
def _matmul_cpu_wide(x, w):
    """x @ w, with the weight gradient computed as copy(x^T) @ g. XLA:CPU otherwise contracts over the
    rows of x in place, and with g's row stride a multiple of 2048 floats that runs at ~80 GFLOP/s
    instead of ~135 on CPU-2 (2048 x 1024 x 4096, the 150M MLP's input weight; strides of 3072, 4000
    or 5120 do not slow down, so other shapes keep the plain product)."""
    return x @ w


def _matmul_cpu_wide_fwd(x, w):
    return x @ w, (x, w)


def _matmul_cpu_wide_bwd(res, g):
    x, w = res
    x_t = jax.lax.optimization_barrier(x.T)  # the barrier keeps XLA from folding the transpose into the dot
    return g @ w.T, x_t @ g


_matmul_cpu_wide.defvjp(_matmul_cpu_wide_fwd, _matmul_cpu_wide_bwd)


def _dense(features, axes, in_axis_count=1, name=None):
    return DenseGeneral(features if isinstance(features, tuple) else (features,), axes, in_axis_count,
                        name=name)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, rope, bias):
        c = self.cfg
        # One fused projection for q, k, v (one large matmul is faster than three small ones).
        qkv = _dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "kv"), name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # (B, H, L, D) layout: batched matmuls with leading batch dims are the fastest on CPU.
        q, k, v = (_constrain(t.transpose(0, 2, 1, 3), ("batch", "heads", "length", "kv")) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if jax.default_backend() == "cpu":
            # keeps XLA:CPU from fusing the transposes and RoPE into the attention matmuls' operand copies,
            # which it then runs slower (default model: 438 -> 386 and 412 -> 372 ms per step, interleaved A/B)
            q, k, v = jax.lax.optimization_barrier((q, k, v))
        blocks = c.query_blocks or query_block_count(q.shape[2])
        out = causal_attention(q * c.head_dim ** -0.5, k, v, mask, bias, blocks).transpose(0, 2, 1, 3)
        out = _constrain(out, ("batch", "length", "heads", "kv"))
        return _dense(c.d_model, ("heads", "kv", "embed"), in_axis_count=2, name="out")(out)


def query_block_count(length: int) -> int:
    """Auto query blocks: on CPU, blocks of at least 64 queries (at most 4); elsewhere one block."""
    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(4, length // 64))


def causal_attention(q, k, v, mask, bias=None, blocks: int = 1):
    """softmax(q k^T + bias, where mask) v for (B, H, L, D) q, k, v, a causal `mask` (B|1, 1, L, L) and an
    optional `bias` (1, H, L, L). With blocks > 1 the queries are split into that many row blocks, and
    block i only meets the keys up to its last query: the tiles right of the diagonal, all masked by
    causality, are never computed (with 2 blocks a quarter of the scores, with 4 three eighths).
    Exact: a causal mask gives those keys zero weight anyway.
    """
    length = q.shape[2]
    bounds = [round(length * i / blocks) for i in range(blocks + 1)]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        scores = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, lo:hi], k[:, :, :hi])
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # bf16 in, fp32 softmax
        if bias is not None:
            b = bias[:, :, lo:hi, :hi].astype(scores.dtype)
            scores = add_shared_bias(scores, b) if b.shape[0] == 1 else scores + b
        probs = masked_softmax(scores, mask[:, :, lo:hi, :hi]).astype(v.dtype)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", probs, v[:, :, :hi]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


@jax.custom_vjp
def add_shared_bias(scores, bias):
    """scores (B, H, Q, K) + bias (1, H, Q, K) of the same dtype, the bias shared over the batch. Same as
    `+`; its backward sums the batch with a matmul against ones: XLA:CPU otherwise fuses the per-layer
    batch sums, the block pads and the sum over layers into one fusion of ~0.7-1.7 s per 150M step."""
    return scores + bias


def _add_shared_bias_fwd(scores, bias):
    return scores + bias, None


def _add_shared_bias_bwd(_, g):
    return g, jnp.einsum("bhqk,b->hqk", g, jnp.ones(g.shape[0], g.dtype))[None]


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def masked_softmax(scores, mask):
    """Softmax over the last axis where `mask` is True; rows with no True entry give zeros, never NaN."""
    peak = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True))
    # exp of -inf (not a where after the exp): masked entries then get zero gradient, never inf * 0 = NaN
    e = jnp.exp(jnp.where(mask, scores - jnp.where(jnp.isfinite(peak), peak, 0.0), -jnp.inf))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e * (1.0 / jnp.where(total > 0, total, 1.0))


class Mlp(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        h = _dense(self.cfg.mlp_dim, ("embed", "mlp"), name="wi")(x)
        h = _constrain(nn.gelu(h), ("batch", "length", "mlp"))
        return _dense(self.cfg.d_model, ("mlp", "embed"), name="wo")(h)


def _norm(name):
    return nn.LayerNorm(name=name, dtype=jnp.float32,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
    """Pre-LN block. Returns (x, out) with named intermediates for probes."""
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, rope, bias):
        dtype = jnp.dtype(self.cfg.dtype)
        h = _norm("ln_attn")(x).astype(dtype)
        x = x + Attention(self.cfg, name="attn")(h, mask, rope, bias)
        h = _norm("ln_mlp")(x).astype(dtype)
        x = x + Mlp(self.cfg, name="mlp")(h)
        x = _constrain(x, ("batch", "length", "act_embed"))
        return x, {"resid": x}


class Transformer(nn.Module):
    """Decoder-only LM. `embed` is any module with encode(tokens) and logits(h, ctx).

    __call__(tokens (B, L) int, segment_ids (B, L) int or None, targets=None, **embed_kwargs)
      -> (out, hidden: dict with 'final' (B, L, d) and 'layers' (list of (B, L, d)))
    out is logits (B, L, V) float32, or with `targets` (B, L) the per-token NLL (B, L) float32 — through
    the embedding's own `nll` when it has one (a readout that never materialises the logits).
    """
    cfg: TransformerConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens, segment_ids=None, targets=None, **embed_kwargs):
        c = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        length = tokens.shape[1]
        x, ctx = self.embed.encode(tokens, **embed_kwargs)
        x = _constrain(x.astype(jnp.dtype(c.dtype)), ("batch", "length", "act_embed"))
        causal = jnp.tril(jnp.ones((length, length), bool))
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
        mask = (causal[None] & same)[:, None]  # (B, 1, L, L)
        rope = rope_tables(segment_positions(segment_ids), c.head_dim, max_position=length) \
            if c.position == "rope" else None
        bias = T5RelativeBias(c.num_heads, c.rel_buckets, c.rel_max_distance, name="rel_bias")(length) \
            if c.position == "t5" else None
        block = nn.remat(Block) if c.remat else Block
        layers = []
        for i in range(c.num_layers):
            x, _ = block(c, name=f"block_{i}")(x, mask, rope, bias)
            layers.append(x)
        h = _norm("ln_final")(x).astype(jnp.dtype(c.dtype))
        hidden = {"final": h, "layers": layers}
        if targets is None:
            return self.embed.logits(h, ctx), hidden
        if hasattr(self.embed, "nll"):
            return self.embed.nll(h, ctx, targets), hidden
        return token_nll(self.embed.logits(h, ctx), targets), hidden

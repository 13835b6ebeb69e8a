"""The shared pre-LN Transformer: a causal decoder (default) or, with `causal=False`, a bidirectional encoder,
with a pluggable embedding module.

Parameters and activations carry logical axis names ('batch', 'length', 'embed', 'heads', 'kv', 'mlp',
'vocab') that the training core maps to mesh axes. Packed inputs: `segment_ids` (B, L) keep tokens from
attending across document boundaries (0 or negative marks padding), and RoPE positions restart in each
segment. An optional `attention_mask` (B, L) (True or 1 at real tokens, as in Hugging Face models) also
hides keys. The options a BERT/ESM-style encoder needs (LayerNorm epsilon, MLP activation, projection
biases, final LayerNorm) and a T5 encoder needs (RMS norm, no query scaling, gated MLP) are config fields
whose defaults give the decoder's exact numbers.

Exact rewrites that only change speed on some backends are chosen in one place: `resolve_speed_paths`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.nn.embeddings import token_nll
from jaxemb.nn.positions import T5RelativeBias, apply_rope, rope_tables, segment_positions

ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),   # flax's default gelu
    "gelu_erf": functools.partial(nn.gelu, approximate=False),   # exact gelu (PyTorch's default, BERT, ESM)
    "relu": nn.relu,
}
SPEED_PATHS = ("auto", "cpu", "plain")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    position: str = "rope"  # 'rope' (rotate-half form, see positions.apply_rope) | 't5' | 'none'
    rel_buckets: int = 32
    rel_max_distance: int = 128
    remat: bool = False
    dtype: str = "float32"  # activation dtype inside the blocks
    # causal attention in this many query blocks, skipping the all-masked key tiles right of the diagonal;
    # 0 = auto (see query_block_count). Causal models only.
    query_blocks: int = 0
    causal: bool = True           # False: bidirectional self-attention (an encoder)
    norm_eps: float = 1e-6        # LayerNorm epsilon (flax's default; PyTorch's and ESM2's is 1e-5)
    mlp_activation: str = "gelu_tanh"  # one of ACTIVATIONS
    use_bias: bool = False        # biases on the q/k/v, attention output and both MLP projections
    final_norm: bool = True       # LayerNorm on the last block's output
    speed_paths: str = "auto"     # one of SPEED_PATHS, see resolve_speed_paths
    # RoPE inverse frequencies (head_dim/2 floats) read from a checkpoint (ESM stores its own, possibly
    # fp16-rounded); () = base 10000
    rope_inv_freq: tuple = ()
    norm: str = "layer"           # 'layer' (LayerNorm) | 'rms' (T5's: no mean subtraction, no bias)
    attn_scale: bool = True       # scale queries by head_dim^-0.5 (T5 folds it into its init: False)
    mlp_gated: bool = False       # act(x wi) * (x wi_linear) (T5's gated-GELU) instead of act(x wi)
    # queries per attention chunk (see chunked_attention): the (L, L) scores exist one chunk of rows at a
    # time, forward and backward (recomputed per chunk), so attention memory is O(chunk x L), not O(L^2);
    # 0 = whole length. Exact; used where the length exceeds the chunk.
    attention_chunk: int = 0

    def __post_init__(self):
        if self.position not in ("rope", "t5", "none"):
            raise ValueError(f"position={self.position!r}; expected 'rope', 't5' or 'none'")
        if self.query_blocks < 0:
            raise ValueError(f"query_blocks={self.query_blocks}; expected 0 (auto) or a positive count")
        if not self.causal and self.query_blocks > 1:
            raise ValueError(f"query_blocks={self.query_blocks} with causal=False; query blocks skip the keys "
                             "after each block, so an encoder needs query_blocks 0 or 1")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.speed_paths not in SPEED_PATHS:
            raise ValueError(f"speed_paths={self.speed_paths!r}; expected one of {SPEED_PATHS}")
        if self.rope_inv_freq and len(self.rope_inv_freq) != self.head_dim // 2:
            raise ValueError(f"rope_inv_freq has {len(self.rope_inv_freq)} values; expected head_dim/2 = "
                             f"{self.head_dim // 2}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm={self.norm!r}; expected 'layer' or 'rms'")
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk={self.attention_chunk}; expected 0 (whole length) or a positive "
                             "number of queries")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps}; expected a positive number")


@dataclasses.dataclass(frozen=True)
class SpeedPaths:
    """Exact rewrites of the computation that only change its speed (values equal the plain path's up to
    float rounding). Each was chosen by A/B timing on XLA:CPU; BENCHMARKS.md has the numbers."""
    wide_matmul: bool = False       # outputs a multiple of 2048 wide: weight gradient on a transposed copy of x
    qkv_barrier: bool = False       # optimization barrier on q, k, v before the attention matmuls
    shared_bias_vjp: bool = False   # batch-shared position bias: backward sums the batch by a matmul with ones
    auto_query_blocks: bool = False  # query_blocks=0 in a causal model: up to 4 blocks of >= 64 queries, not 1


_SPEED_PATHS = {"cpu": SpeedPaths(True, True, True, True), "plain": SpeedPaths()}


def resolve_speed_paths(name: str) -> SpeedPaths:
    """The one place that looks at the backend. 'cpu': every path; 'plain': none; 'auto': 'cpu' on the CPU
    backend, elsewhere only the shared-bias backward (the others were tuned for XLA:CPU)."""
    if name == "auto":
        return _SPEED_PATHS["cpu"] if jax.default_backend() == "cpu" else SpeedPaths(shared_bias_vjp=True)
    if name not in _SPEED_PATHS:
        raise ValueError(f"speed_paths={name!r}; expected one of {SPEED_PATHS}")
    return _SPEED_PATHS[name]


class DenseGeneral(nn.Module):
    """x (..., *in_dims) -> (..., *features) with a kernel of shape (*in_dims, *features) named `axes`, and
    with `use_bias` a bias of shape `features` named by the last len(features) axes."""
    features: tuple
    axes: tuple
    in_dims: int = 1
    use_bias: bool = False
    wide_matmul: bool = False  # SpeedPaths.wide_matmul

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
        y = matmul(x.reshape(-1, fan_in), kernel.astype(x.dtype).reshape(fan_in, fan_out), self.wide_matmul)
        y = y.reshape(*x.shape[:-self.in_dims], *features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[-len(features):]), features)
            y = y + bias.astype(y.dtype)
        return y


def matmul(x, w, wide_path: bool = False):
    """x (M, K) @ w (K, N); with `wide_path` and N a multiple of 2048, through `_matmul_cpu_wide`."""
    if wide_path and w.shape[1] % 2048 == 0:
        return _matmul_cpu_wide(x, w)
    return x @ w


@jax.custom_vjp
def _matmul_cpu_wide(x, w):
    """x @ w, with the weight gradient computed as copy(x^T) @ g. XLA:CPU otherwise contracts over the
    rows of x in place, which is slow when g's row stride is a power of two >= 2048 floats."""
    return x @ w


def _matmul_cpu_wide_fwd(x, w):
    return x @ w, (x, w)


def _matmul_cpu_wide_bwd(res, g):
    x, w = res
    x_t = jax.lax.optimization_barrier(x.T)  # the barrier keeps XLA from folding the transpose into the dot
    return g @ w.T, x_t @ g


_matmul_cpu_wide.defvjp(_matmul_cpu_wide_fwd, _matmul_cpu_wide_bwd)


def _dense(features, axes, in_axis_count=1, name=None, cfg: TransformerConfig | None = None):
    use_bias = cfg is not None and cfg.use_bias
    wide = cfg is not None and resolve_speed_paths(cfg.speed_paths).wide_matmul
    return DenseGeneral(features if isinstance(features, tuple) else (features,), axes, in_axis_count,
                        use_bias, wide, name=name)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class Attention(nn.Module):
    """Multi-head self-attention on x (B, L, d) where `mask` (B|1, 1, L, L) is True; `rope` (cos, sin) or
    None; `bias` (1, H, L, L) or None. Causal or not is decided by the mask (and cfg.causal for blocking)."""
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, rope, bias):
        c = self.cfg
        paths = resolve_speed_paths(c.speed_paths)
        # One fused projection for q, k, v (one large matmul is faster than three small ones).
        qkv = _dense((3, c.num_heads, c.head_dim), ("embed", None, "heads", "kv"), name="qkv", cfg=c)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # (B, H, L, D) layout: batched matmuls with leading batch dims are the fastest on CPU.
        q, k, v = (_constrain(t.transpose(0, 2, 1, 3), ("batch", "heads", "length", "kv")) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if paths.qkv_barrier:
            # keeps XLA:CPU from fusing the transposes and RoPE into the attention matmuls' operand copies
            q, k, v = jax.lax.optimization_barrier((q, k, v))
        q = q * c.head_dim ** -0.5 if c.attn_scale else q
        if c.attention_chunk and q.shape[2] > c.attention_chunk:
            out = chunked_attention(q, k, v, mask, bias, c.attention_chunk, paths.shared_bias_vjp)
        else:
            out = masked_attention(q, k, v, mask, bias, query_block_count(c, q.shape[2], paths),
                                   paths.shared_bias_vjp)
        out = out.transpose(0, 2, 1, 3)
        out = _constrain(out, ("batch", "length", "heads", "kv"))
        return _dense(c.d_model, ("heads", "kv", "embed"), in_axis_count=2, name="out", cfg=c)(out)


def query_block_count(cfg: TransformerConfig, length: int, paths: SpeedPaths) -> int:
    """cfg.query_blocks when set; else, in a causal model with paths.auto_query_blocks, blocks of at least
    64 queries (at most 4); else one block. Encoders always use one block."""
    if not cfg.causal:
        return 1
    if cfg.query_blocks:
        return cfg.query_blocks
    return max(1, min(4, length // 64)) if paths.auto_query_blocks else 1


def masked_attention(q, k, v, mask, bias=None, blocks: int = 1, shared_bias_vjp: bool = False):
    """softmax(q k^T + bias, where mask) v for (B, H, L, D) q, k, v, a boolean `mask` (B|1, 1, L, L) and
    an optional `bias` (B|1, H, L, L). Rows with no True entry give zeros.

    blocks > 1 needs a causal mask: the queries are split into that many row blocks, and block i only
    meets the keys up to its last query, so the tiles right of the diagonal (all masked by causality) are
    never computed (with 2 blocks a quarter of the scores, with 4 three eighths). Exact, since a causal mask
    gives those keys zero weight anyway. `shared_bias_vjp`: add a batch-shared bias by `add_shared_bias`.
    """
    length = q.shape[2]
    bounds = [round(length * i / blocks) for i in range(blocks + 1)]
    outs = [_attend(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, :, lo:hi, :hi],
                    None if bias is None else bias[:, :, lo:hi, :hi], shared_bias_vjp)
            for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def _attend(q, k, v, mask, bias, shared_bias_vjp):
    """softmax(q k^T + bias, where mask) v for Q queries (B, H, Q, D) and K keys; mask (B|1, 1, Q, K)."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # bf16 in, fp32 softmax
    if bias is not None:
        b = bias.astype(scores.dtype)
        scores = add_shared_bias(scores, b) if shared_bias_vjp and b.shape[0] == 1 else scores + b
    probs = masked_softmax(scores, mask).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def chunked_attention(q, k, v, mask, bias=None, chunk: int = 256, shared_bias_vjp: bool = False):
    """masked_attention(q, k, v, mask, bias) computed `chunk` queries at a time under jax.checkpoint: only
    one chunk's (chunk, L) scores and probabilities are alive, in the forward and in the backward (which
    recomputes them), instead of the whole (L, L) per layer. The queries are zero-padded to whole chunks
    with all-False mask rows, which give zero outputs and are sliced off. Same values as the plain path up
    to float rounding (each row's softmax is the same computation); one chunk's work per loop step."""
    B, H, L, D = q.shape
    n = -(-L // chunk)
    pad = n * chunk - L

    def split(a):  # (b, h, L, ...) -> (n, b, h, chunk, ...): query rows in chunks
        a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
        return jnp.moveaxis(a.reshape(a.shape[:2] + (n, chunk) + a.shape[3:]), 2, 0)

    @jax.checkpoint
    def one(args):
        qc, mc, bc = args
        return _attend(qc, k, v, mc, bc, shared_bias_vjp)

    out = jax.lax.map(one, (split(q), split(mask), None if bias is None else split(bias)))
    return jnp.moveaxis(out, 0, 2).reshape(B, H, n * chunk, D)[:, :, :L]


@jax.custom_vjp
def add_shared_bias(scores, bias):
    """scores (B, H, Q, K) + bias (1, H, Q, K) of the same dtype, the bias shared over the batch. Same as
    `+`; its backward sums the batch with a matmul against ones: XLA:CPU otherwise fuses the per-layer
    batch sums, the block pads and the sum over layers into one slow fusion."""
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
        c = self.cfg
        h = _dense(c.mlp_dim, ("embed", "mlp"), name="wi", cfg=c)(x)
        h = ACTIVATIONS[c.mlp_activation](h)
        if c.mlp_gated:
            h = h * _dense(c.mlp_dim, ("embed", "mlp"), name="wi_linear", cfg=c)(x)
        h = _constrain(h, ("batch", "length", "mlp"))
        return _dense(c.d_model, ("mlp", "embed"), name="wo", cfg=c)(h)


def _norm(name, eps: float = 1e-6, kind: str = "layer"):
    if kind == "rms":
        return nn.RMSNorm(epsilon=eps, name=name, dtype=jnp.float32,
                          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))
    return nn.LayerNorm(epsilon=eps, name=name, dtype=jnp.float32,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
    """Pre-LN block. Returns (x, out) with named intermediates for probes."""
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, rope, bias):
        dtype = jnp.dtype(self.cfg.dtype)
        h = _norm("ln_attn", self.cfg.norm_eps, self.cfg.norm)(x).astype(dtype)
        x = x + Attention(self.cfg, name="attn")(h, mask, rope, bias)
        h = _norm("ln_mlp", self.cfg.norm_eps, self.cfg.norm)(x).astype(dtype)
        x = x + Mlp(self.cfg, name="mlp")(h)
        x = _constrain(x, ("batch", "length", "act_embed"))
        return x, {"resid": x}


def attention_mask_from(segment_ids, causal: bool, attention_mask=None):
    """(B, 1, L, L) bool: query i may see key j when both are in the same segment, key j is not padding
    (segment id > 0, and attention_mask[j] true when given) and, if causal, j <= i."""
    length = segment_ids.shape[1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    if attention_mask is not None:
        same = same & attention_mask.astype(bool)[:, None, :]
    if not causal:
        return same[:, None]
    return (jnp.tril(jnp.ones((length, length), bool))[None] & same)[:, None]


class Transformer(nn.Module):
    """Decoder-only LM, or with cfg.causal=False a bidirectional encoder. `embed` is any module with
    encode(tokens) and logits(h, ctx).

    __call__(tokens (B, L) int, segment_ids (B, L) int or None, targets=None, attention_mask=None,
             **embed_kwargs)
      -> (out, hidden: dict with 'final' (B, L, d) and 'layers' (list of (B, L, d)))
    out is logits (B, L, V) float32, or with `targets` (B, L) the per-token NLL (B, L) float32 — through
    the embedding's own `nll` when it has one (a readout that never materialises the logits). 'final' is the
    last block's output after the final LayerNorm (when cfg.final_norm). Outputs at padding positions are
    finite but meaningless.
    """
    cfg: TransformerConfig
    embed: nn.Module

    @nn.compact
    def __call__(self, tokens, segment_ids=None, targets=None, attention_mask=None, **embed_kwargs):
        c = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        for name, arr in (("segment_ids", segment_ids), ("attention_mask", attention_mask)):
            if arr is not None and arr.shape != tokens.shape:
                raise ValueError(f"{name} has shape {arr.shape}; expected the tokens' shape {tokens.shape}")
        length = tokens.shape[1]
        x, ctx = self.embed.encode(tokens, **embed_kwargs)
        x = _constrain(x.astype(jnp.dtype(c.dtype)), ("batch", "length", "act_embed"))
        mask = attention_mask_from(segment_ids, c.causal, attention_mask)
        rope = None
        if c.position == "rope" and c.rope_inv_freq:  # the angles as HF computes them: fp32 position * freq
            freq = np.asarray(c.rope_inv_freq, np.float32)
            angle = segment_positions(segment_ids)[..., None].astype(jnp.float32) * np.concatenate([freq, freq])
            rope = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
        elif c.position == "rope":
            rope = rope_tables(segment_positions(segment_ids), c.head_dim, max_position=length)
        bias = T5RelativeBias(c.num_heads, c.rel_buckets, c.rel_max_distance, bidirectional=not c.causal,
                              name="rel_bias")(length) if c.position == "t5" else None
        block = nn.remat(Block) if c.remat else Block
        layers = []
        for i in range(c.num_layers):
            x, _ = block(c, name=f"block_{i}")(x, mask, rope, bias)
            layers.append(x)
        h = (_norm("ln_final", c.norm_eps, c.norm)(x) if c.final_norm else x).astype(jnp.dtype(c.dtype))
        hidden = {"final": h, "layers": layers}
        if targets is None:
            return self.embed.logits(h, ctx), hidden
        if hasattr(self.embed, "nll"):
            return self.embed.nll(h, ctx, targets), hidden
        return token_nll(self.embed.logits(h, ctx), targets), hidden

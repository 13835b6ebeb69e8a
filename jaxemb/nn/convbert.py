"""One ConvBERT layer, numerically equal to Hugging Face transformers' `ConvBertLayer` (num_groups 1), as the
ppiseq ConvBERT heads use it on frozen PLM features: hidden D, `num_heads` 8 with `head_ratio` 2, i.e. 4
self-attention heads and 4 span-based dynamic-convolution heads of size D/8 each, kernel 7, intermediate
D/2, exact (erf) GELU, post-LayerNorm with eps 1e-12.

    y = ConvBertLayer().apply({"params": params}, x, mask)     # x (B, L, D), mask (B, L) -> (B, L, D)

Mixed attention, as HF computes it (H = num_heads // head_ratio heads of size hs = D / (2H), A = H * hs):
  - self-attention heads: softmax(q k^T / sqrt(hs)) v over the unmasked keys;
  - convolution heads: a separable conv (depthwise over length, kernel k, zero padding at the ends; then
    pointwise D -> A, plus a bias) of x, times q, gives through `conv_kernel` a softmax over the k offsets
    per position and head; those weights mix the k neighbours (offsets -(k-1)/2 .. (k-1)/2) of
    `conv_out`(x), HF's unfold;
  - the two contexts are concatenated (attention heads first) into D features, then dense, dropout,
    LayerNorm(. + x); then dense D -> I, GELU, dense I -> D, dropout, LayerNorm(. + .).

Padding. HF applies the attention mask only to the attention scores; its convolution branch (the separable
conv over the sequence and the unfold of `conv_out`) reads pad positions, and ppiseq sidesteps that with
batch size 1. Here pad positions never reach a real position: the input's pad rows are set to zero before
anything else (so NaN or huge values there cannot leak), the convolution branch reads a neighbour only when
it is a real position of the same segment (others count as zero, exactly as HF's zero padding at the
sequence ends; note `conv_out` has a bias, so zeroing its input alone would not do), and the attention
hides pad keys. Hence the real positions of a right- or left-padded row equal HF's output for that sequence
alone, unpadded, at batch size 1. With `segment_ids` (B, L) (> 0 real, <= 0 padding, as in
nn/transformer.py) several sequences packed in one row are kept apart the same way, in both branches. The
outputs at pad positions are finite and meaningless; pool with the mask.

Parameters carry logical axis names ('embed', 'heads', 'kv', 'mlp'), as in nn/transformer.py; their
initialisation is PyTorch's default for a freshly built HF `ConvBertLayer` (which ppiseq trains from):
Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the separable conv's weights N(0, 0.02) and
its bias 0, LayerNorm 1 and 0. `params_from_hf` maps an HF state dict onto this tree.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {  # Hugging Face's names
    "gelu": functools.partial(nn.gelu, approximate=False),   # erf GELU, HF's "gelu"
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}


def _torch_linear_init(fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _param(module, name, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Dense(nn.Module):
    """x (..., *in_shape) -> (..., *features), kernel (*in_shape, *features) named `axes`, bias (*features)
    named by the last len(features) axes; PyTorch Linear's initialisation."""
    features: tuple
    axes: tuple
    in_dims: int = 1
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_dims:]
        fan_in, fan_out = math.prod(in_shape), math.prod(self.features)
        init = _torch_linear_init(fan_in)
        kernel = _param(self, "kernel", init, in_shape + self.features, self.axes, self.param_dtype)
        bias = _param(self, "bias", init, self.features, self.axes[-len(self.features):], self.param_dtype)
        y = x.reshape(-1, fan_in) @ kernel.astype(x.dtype).reshape(fan_in, fan_out)
        return y.reshape(*x.shape[:x.ndim - self.in_dims], *self.features) + bias.astype(x.dtype)


def _neighbours(v, same, k):
    """Yields (offset index j, v shifted so that row l holds row l + j - (k-1)/2, zero where `same[..., j]`
    is False or outside the sequence). v (B, L, ...), same (B, L, k) bool."""
    p = (k - 1) // 2
    length = v.shape[1]
    pad = [(0, 0)] * v.ndim
    pad[1] = (p, p)
    vp = jnp.pad(v, pad)
    for j in range(k):
        ok = same[:, :, j].reshape(same.shape[:2] + (1,) * (v.ndim - 2))
        yield j, jnp.where(ok, vp[:, j:j + length], 0)


class ConvBertSelfAttention(nn.Module):
    """HF's ConvBertSelfAttention: x (B, L, D) -> the concatenated contexts (B, L, 2, H, hs), [0] from the
    self-attention heads, [1] from the convolution heads. `seg` (B, L) int: > 0 real, <= 0 padding."""
    num_heads: int
    head_size: int
    kernel_size: int
    attention_dropout: float = 0.1
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, seg, deterministic: bool = True):
        h, hs, k, dt = self.num_heads, self.head_size, self.kernel_size, self.param_dtype
        d = x.shape[-1]
        proj = functools.partial(Dense, (h, hs), ("embed", "heads", "kv"), param_dtype=dt)
        q, key, v = proj(name="query")(x), proj(name="key")(x), proj(name="value")(x)
        real = seg > 0

        # self-attention heads; keys of other segments and pad keys hidden
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, key) / math.sqrt(hs)
        allowed = (seg[:, :, None] == seg[:, None, :]) & real[:, None, :]
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), -1).astype(x.dtype)
        probs = nn.Dropout(self.attention_dropout)(probs, deterministic=deterministic)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v)

        # neighbour l + j - (k-1)/2 of row l counts only when it is a real position of l's segment
        p = (k - 1) // 2
        seg_p = jnp.pad(seg, ((0, 0), (p, p)))
        same = jnp.stack([(seg_p[:, j:j + seg.shape[1]] == seg) & real for j in range(k)], -1)

        # separable conv (HF's key_conv_attn_layer): depthwise over length, then pointwise D -> A, + bias
        depthwise = _param(self, "key_conv_depthwise", nn.initializers.normal(0.02), (k, d), (None, "embed"), dt)
        pointwise = _param(self, "key_conv_pointwise", nn.initializers.normal(0.02), (d, h, hs),
                           ("embed", "heads", "kv"), dt)
        sep_bias = _param(self, "key_conv_bias", nn.initializers.zeros, (h, hs), ("heads", "kv"), dt)
        dw = sum(depthwise[j].astype(x.dtype) * xs for j, xs in _neighbours(x, same, k))
        key_conv = jnp.einsum("bld,dhe->blhe", dw, pointwise.astype(x.dtype)) + sep_bias.astype(x.dtype)

        # dynamic kernels: softmax over the k offsets, per position and head
        kernels = Dense((h, k), (None, None, "heads", None), in_dims=2, param_dtype=dt,
                        name="conv_kernel")(key_conv * q)
        kernels = jax.nn.softmax(kernels.astype(jnp.promote_types(kernels.dtype, jnp.float32)), -1)
        kernels = kernels.astype(x.dtype)
        values = proj(name="conv_out")(x)
        conv = sum(kernels[..., j, None] * vs for j, vs in _neighbours(values, same, k))
        return jnp.stack([attn, conv], axis=2)


class ResidualOutput(nn.Module):
    """HF's ConvBertSelfOutput / ConvBertOutput: LayerNorm(dropout(dense(h)) + residual)."""
    in_dims: int
    in_axes: tuple
    dropout: float
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, residual, deterministic: bool = True):
        d = residual.shape[-1]
        y = Dense((d,), self.in_axes + ("embed",), in_dims=self.in_dims, param_dtype=self.param_dtype,
                  name="dense")(h)
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        norm = nn.LayerNorm(self.eps, use_fast_variance=False, param_dtype=self.param_dtype, name="LayerNorm",
                            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
        return norm(y + residual).astype(residual.dtype)


def head_counts(hidden_size: int, num_heads: int, head_ratio: int) -> tuple[int, int]:
    """(H, hs): HF's attention/convolution head count and head size."""
    h = num_heads // head_ratio
    h = h if h >= 1 else 1  # HF: fewer heads than head_ratio -> one head of each kind
    if hidden_size % (2 * h):
        raise ValueError(f"hidden size {hidden_size} is not divisible by 2 * (num_heads // head_ratio) = {2 * h}"
                         f" (num_heads={num_heads}, head_ratio={head_ratio}); HF's layer needs it")
    return h, hidden_size // (2 * h)


class ConvBertLayer(nn.Module):
    """Hugging Face `ConvBertLayer` (see the module docstring). Call: (x (B, L, D), mask (B, L) bool or 0/1,
    optional; segment_ids (B, L) int, optional, > 0 real; deterministic) -> (B, L, D) in x's dtype. Dropout
    (when not deterministic) needs a 'dropout' rng."""
    num_heads: int = 8               # HF num_attention_heads: attention + convolution heads together
    head_ratio: int = 2
    kernel_size: int = 7             # odd (HF's layer fails for an even one)
    intermediate_size: int | None = None   # None: hidden // 2, as ppiseq
    hidden_act: str = "gelu"         # one of ACTIVATIONS (HF names); "gelu" is the exact erf GELU
    hidden_dropout: float = 0.1      # HF hidden_dropout_prob (ppiseq keeps the default 0.1)
    attention_dropout: float = 0.1   # HF attention_probs_dropout_prob
    layer_norm_eps: float = 1e-12
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, *, segment_ids=None, deterministic: bool = True):
        if x.ndim != 3:
            raise ValueError(f"x has shape {x.shape}; expected (batch, length, hidden)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size}; expected an odd positive number")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        b, length, d = x.shape
        h, hs = head_counts(d, self.num_heads, self.head_ratio)
        seg = jnp.ones((b, length), jnp.int32)
        for name, m in (("mask", mask), ("segment_ids", segment_ids)):
            if m is not None and m.shape != (b, length):
                raise ValueError(f"{name} has shape {m.shape}; expected (batch, length) = {(b, length)}")
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids, jnp.int32)
        if mask is not None:
            seg = jnp.where(jnp.asarray(mask).astype(bool), seg, 0)
        seg = jnp.where(seg > 0, seg, 0)
        x = jnp.where((seg > 0)[..., None], x, 0)  # pad rows can hold anything, even NaN

        ctx = ConvBertSelfAttention(h, hs, self.kernel_size, self.attention_dropout, self.param_dtype,
                                    name="self_attention")(x, seg, deterministic)
        out = functools.partial(ResidualOutput, dropout=self.hidden_dropout, eps=self.layer_norm_eps,
                                param_dtype=self.param_dtype)
        a = out(3, (None, "heads", "kv"), name="attention_output")(ctx, x, deterministic)
        inter = self.intermediate_size or d // 2
        hid = Dense((inter,), ("embed", "mlp"), param_dtype=self.param_dtype, name="intermediate")(a)
        hid = ACTIVATIONS[self.hidden_act](hid)
        return out(1, ("mlp",), name="output")(hid, a, deterministic)


def layer_from_hf_config(config, **overrides) -> ConvBertLayer:
    """A ConvBertLayer with the numbers of an HF `ConvBertConfig` (num_groups 1 only)."""
    if getattr(config, "num_groups", 1) != 1:
        raise ValueError(f"ConvBertConfig.num_groups={config.num_groups}; only 1 (plain dense layers) is supported")
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"ConvBertConfig.hidden_act={config.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
    head_counts(config.hidden_size, config.num_attention_heads, config.head_ratio)
    fields = dict(num_heads=config.num_attention_heads, head_ratio=config.head_ratio,
                  kernel_size=config.conv_kernel_size, intermediate_size=config.intermediate_size,
                  hidden_act=config.hidden_act, hidden_dropout=config.hidden_dropout_prob,
                  attention_dropout=config.attention_probs_dropout_prob, layer_norm_eps=config.layer_norm_eps)
    fields.update(overrides)
    return ConvBertLayer(**fields)


def _hf_layout(d, h, hs, k, inter):
    """HF name -> (HF shape, Flax path, HF array -> Flax array)."""
    a = h * hs
    lin = lambda *shape: lambda w: w.T.reshape(shape)  # noqa: E731  Linear (out, in) -> (in, ...)
    bias = lambda *shape: lambda w: w.reshape(shape)  # noqa: E731
    s = "attention.self."
    table = {
        s + "key_conv_attn_layer.depthwise.weight": ((d, 1, k), ("self_attention", "key_conv_depthwise"),
                                                     lambda w: w[:, 0, :].T),
        s + "key_conv_attn_layer.pointwise.weight": ((a, d, 1), ("self_attention", "key_conv_pointwise"),
                                                     lambda w: w[:, :, 0].T.reshape(d, h, hs)),
        s + "key_conv_attn_layer.bias": ((a, 1), ("self_attention", "key_conv_bias"), bias(h, hs)),
        s + "conv_kernel_layer.weight": ((h * k, a), ("self_attention", "conv_kernel", "kernel"),
                                         lin(h, hs, h, k)),
        s + "conv_kernel_layer.bias": ((h * k,), ("self_attention", "conv_kernel", "bias"), bias(h, k)),
        "attention.output.dense.weight": ((d, 2 * a), ("attention_output", "dense", "kernel"), lin(2, h, hs, d)),
        "attention.output.dense.bias": ((d,), ("attention_output", "dense", "bias"), bias(d)),
        "intermediate.dense.weight": ((inter, d), ("intermediate", "kernel"), lin(d, inter)),
        "intermediate.dense.bias": ((inter,), ("intermediate", "bias"), bias(inter)),
        "output.dense.weight": ((d, inter), ("output", "dense", "kernel"), lin(inter, d)),
        "output.dense.bias": ((d,), ("output", "dense", "bias"), bias(d)),
    }
    for name in ("query", "key", "value", "conv_out_layer"):
        flax_name = "conv_out" if name == "conv_out_layer" else name
        table[s + name + ".weight"] = ((a, d), ("self_attention", flax_name, "kernel"), lin(d, h, hs))
        table[s + name + ".bias"] = ((a,), ("self_attention", flax_name, "bias"), bias(h, hs))
    for norm, path in (("attention.output.LayerNorm", "attention_output"), ("output.LayerNorm", "output")):
        table[norm + ".weight"] = ((d,), (path, "LayerNorm", "scale"), bias(d))
        table[norm + ".bias"] = ((d,), (path, "LayerNorm", "bias"), bias(d))
    return table


def params_from_hf(state_dict, prefix: str = "", layer: ConvBertLayer | None = None) -> dict:
    """The Flax params of ConvBertLayer (for `apply({"params": ...})`) from an HF `ConvBertLayer` state dict
    of numpy arrays ({name: tensor.detach().numpy()}), reading the keys that start with `prefix` (e.g.
    "convbert_layer." inside a ppiseq head, "encoder.layer.0." inside ConvBertModel). Sizes are read from
    the weights; with `layer`, its num_heads // head_ratio, kernel_size and intermediate_size must agree.
    Raises one ValueError naming every missing, unexpected or mis-shaped weight."""
    sd = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
    anchors = {"attention.self.query.weight": 2, "attention.self.key_conv_attn_layer.depthwise.weight": 3,
               "attention.self.conv_kernel_layer.weight": 2, "intermediate.dense.weight": 2}
    bad = [f"{prefix}{n} (missing)" if n not in sd else f"{prefix}{n} (shape {sd[n].shape}, expected {nd}-D)"
           for n, nd in anchors.items() if n not in sd or sd[n].ndim != nd]
    if bad:
        raise ValueError("cannot read the ConvBERT layer sizes from the state dict: " + ", ".join(bad))
    a, d = sd["attention.self.query.weight"].shape
    k = sd["attention.self.key_conv_attn_layer.depthwise.weight"].shape[2]
    hk = sd["attention.self.conv_kernel_layer.weight"].shape[0]
    inter = sd["intermediate.dense.weight"].shape[0]
    h = hk // k
    if h < 1 or hk % k or a % h or 2 * a != d:
        raise ValueError(f"inconsistent ConvBERT sizes in the state dict: query {a}x{d}, kernel {k}, "
                         f"{prefix}attention.self.conv_kernel_layer.weight has {hk} rows (heads * kernel); "
                         f"expected 2 * all_head_size == hidden and rows a multiple of the kernel size")
    if layer is not None:
        want_h, _ = head_counts(d, layer.num_heads, layer.head_ratio)
        want = {"heads": want_h, "kernel_size": layer.kernel_size, "intermediate_size": layer.intermediate_size
                or d // 2}
        got = {"heads": h, "kernel_size": k, "intermediate_size": inter}
        diff = [f"{n}: layer {want[n]}, state dict {got[n]}" for n in want if want[n] != got[n]]
        if diff:
            raise ValueError("state dict does not fit the ConvBertLayer: " + "; ".join(diff))
    table = _hf_layout(d, h, a // h, k, inter)
    missing = [prefix + n for n in table if n not in sd]
    extra = [prefix + n for n in sd if n not in table]
    shapes = [f"{prefix}{n} {sd[n].shape} (expected {s})" for n, (s, _, _) in table.items()
              if n in sd and sd[n].shape != s]
    if missing or extra or shapes:
        parts = [f"{what}: {', '.join(names)}" for what, names in
                 (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)) if names]
        raise ValueError("HF ConvBertLayer state dict does not match: " + "; ".join(parts))
    params: dict = {}
    for name, (_, path, convert) in table.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = convert(sd[name])
    return params

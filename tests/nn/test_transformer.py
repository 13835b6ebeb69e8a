import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.nn.embeddings import TokenEmbedding
from jaxemb.nn.positions import apply_rope, rope_tables, segment_positions, t5_bucket
from jaxemb.nn.transformer import Attention, Transformer, TransformerConfig


def _model(position="rope"):
    cfg = TransformerConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64,
                            position=position)
    return Transformer(cfg, TokenEmbedding(50, 32, tied=False))


@pytest.mark.parametrize("position", ["rope", "t5", "none"])
def test_causal_and_segment_isolation(position):
    rng = np.random.default_rng()
    m = _model(position)
    tokens = jnp.asarray(rng.integers(0, 50, size=(1, 20)), jnp.int32)
    params = m.init(jax.random.key(0), tokens)
    base, _ = m.apply(params, tokens)
    changed = tokens.at[0, 12:].set((tokens[0, 12:] + 1) % 50)
    out, _ = m.apply(params, changed)
    np.testing.assert_allclose(out[0, :12], base[0, :12], atol=1e-5)  # the past does not see the future
    assert np.abs(out[0, 12:] - base[0, 12:]).max() > 1e-3
    # packed: segment 2 (positions 8..19) equals running it alone from position 0
    seg = jnp.asarray([[1] * 8 + [2] * 12], jnp.int32)
    packed, _ = m.apply(params, tokens, seg)
    alone, _ = m.apply(params, tokens[:, 8:])
    np.testing.assert_allclose(packed[0, 8:], alone[0], atol=2e-5)


def test_segment_positions_restart():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg)[0], [0, 1, 2, 0, 1, 0, 0, 1])


def test_rope_matches_float64_reference():
    rng = np.random.default_rng()
    x = rng.normal(size=(2, 3, 7, 8))  # (B, H, L, D)
    pos = rng.integers(0, 100, size=(2, 7))
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), *rope_tables(jnp.asarray(pos), 8)))
    half = 4
    freq = 1.0 / 10000.0 ** (np.arange(half) / half)
    ang = pos[:, None, :, None] * freq
    ref = np.concatenate([x[..., :half] * np.cos(ang) - x[..., half:] * np.sin(ang),
                          x[..., half:] * np.cos(ang) + x[..., :half] * np.sin(ang)], -1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # the constant-table lookup (positions known to be < max_position) gives the same rotation
    looked_up = apply_rope(jnp.asarray(x, jnp.float32), *rope_tables(jnp.asarray(pos), 8, max_position=100))
    np.testing.assert_allclose(np.asarray(looked_up), ref, rtol=1e-4, atol=1e-4)
    # rotation: relative property q(m).k(n) depends on m - n only
    q = rng.normal(size=(1, 1, 1, 8))
    k = rng.normal(size=(1, 1, 1, 8))
    rot = lambda v, m: apply_rope(jnp.asarray(v, jnp.float32), *rope_tables(jnp.asarray([[m]]), 8))
    dots = [float(jnp.sum(rot(q, m + 5) * rot(k, m))) for m in (0, 9, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def _t5_bucket_ref(rel, nb=32, md=128, bidirectional=False):
    offset = 0
    if bidirectional:
        nb //= 2
        offset = nb if rel > 0 else 0
        n = abs(rel)
    else:
        n = max(-rel, 0)
    exact = nb // 2
    if n < exact:
        return offset + n
    return offset + min(nb - 1, exact + int(np.log(n / exact) / np.log(md / exact) * (nb - exact)))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_buckets_match_reference(bidirectional):
    rel = np.arange(-400, 400)
    got = np.asarray(t5_bucket(jnp.asarray(rel), 32, 128, bidirectional))
    np.testing.assert_array_equal(got, [_t5_bucket_ref(int(r), bidirectional=bidirectional) for r in rel])
    assert (got[rel > 0] >= 16).all() == bidirectional  # an encoder tells later keys from earlier ones


def test_attention_matches_float64_reference():
    rng = np.random.default_rng()
    cfg = TransformerConfig(d_model=24, num_heads=3, head_dim=8, position="none")
    att = Attention(cfg)
    b, l = 2, 9
    x = rng.normal(size=(b, l, 24)).astype(np.float32)
    mask = np.tril(np.ones((l, l), bool))[None, None]
    params = att.init(jax.random.key(int(rng.integers(1 << 30))), x, mask, None, None)
    out = np.asarray(att.apply(params, x, mask, None, None))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.tree.map(lambda v: v, params))["params"]
    unbox = lambda t: np.asarray(getattr(t, "value", t), np.float64)
    wq, wk, wv = (unbox(p["qkv"]["kernel"])[:, i] for i in range(3))
    wo = unbox(p["out"]["kernel"])
    xd = x.astype(np.float64)
    q, k, v = (np.einsum("bld,dhk->blhk", xd, w) for w in (wq, wk, wv))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    s = np.where(mask, s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    ref = np.einsum("hkd,blhk->bld", wo, np.einsum("bhqk,bkhd->bqhd", pr, v))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_masked_softmax_matches_reference_and_has_finite_gradients():
    from jaxemb.nn.transformer import masked_softmax
    rng = np.random.default_rng()
    s = rng.normal(size=(3, 6, 6)) * 50  # large scores: a naive masked exp overflows
    mask = rng.random((3, 6, 6)) < 0.6
    mask[0, 2] = False  # a fully masked row gives zeros
    p = np.asarray(masked_softmax(jnp.asarray(s, jnp.float32), jnp.asarray(mask)))
    ref = np.where(mask, np.exp(s - np.where(mask, s, -np.inf).max(-1, keepdims=True)), 0)
    ref = np.nan_to_num(ref / np.maximum(ref.sum(-1, keepdims=True), 1e-300))
    np.testing.assert_allclose(p, ref, atol=1e-6)
    assert (p[0, 2] == 0).all()
    g = jax.grad(lambda x: jnp.sum(masked_softmax(x, jnp.asarray(mask)) * jnp.arange(6.0)))(jnp.asarray(s, jnp.float32))
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7])
def test_blocked_causal_attention_matches_float64_reference(blocks):
    """Query blocks that skip the tiles right of the diagonal give full causal attention, values and
    gradients, with packed segments, padding rows, a T5-style bias and a length not a multiple of blocks."""
    from jaxemb.nn.transformer import masked_attention
    rng = np.random.default_rng()
    b, h, l, d = 2, 3, 11, 4
    q, k, v = (rng.normal(size=(b, h, l, d)) for _ in range(3))
    bias = rng.normal(size=(1, h, l, l))
    seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11])
    mask = (np.tril(np.ones((l, l), bool))[None] & (seg[:, :, None] == seg[:, None, :])
            & (seg[:, None, :] > 0))[:, None]
    s = np.where(mask, np.einsum("bhqd,bhkd->bhqk", q, k) + bias, -np.inf)
    peak = np.where(np.isfinite(s.max(-1, keepdims=True)), s.max(-1, keepdims=True), 0)
    e = np.exp(s - peak)
    ref = np.einsum("bhqk,bhkd->bhqd", e / np.maximum(e.sum(-1, keepdims=True), 1e-300), v)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v)]
        out = masked_attention(*args, jnp.asarray(mask), jnp.asarray(bias), blocks)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)
        assert (np.asarray(out)[0, :, 9:] == 0).all()  # padding rows: zeros, not NaN
        w = jnp.asarray(rng.normal(size=ref.shape))
        jmask = jnp.asarray(mask)

        def plain(q, k, v, bias):  # the same formula in plain jnp: its gradients are JAX's own
            s = jnp.where(jmask, jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, -jnp.inf)
            peak = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
            e = jnp.exp(s - jnp.where(jnp.isfinite(peak), peak, 0.0))
            return jnp.einsum("bhqk,bhkd->bhqd", e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300), v)

        args.append(jnp.asarray(bias))
        want = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2, 3))(*args)
        for shared_vjp in (False, True):  # the bias shared over the batch added by `+` or add_shared_bias
            got = jax.grad(lambda *a: jnp.sum(masked_attention(*a[:3], jmask, a[3], blocks, shared_vjp) * w),
                           argnums=(0, 1, 2, 3))(*args)
            for g1, g2 in zip(got, want):  # q, k, v and the bias
                np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-10, atol=1e-12)


def test_query_blocks_config_is_checked_and_model_output_does_not_depend_on_it():
    with pytest.raises(ValueError, match="query_blocks"):
        TransformerConfig(query_blocks=-1)
    rng = np.random.default_rng()
    tokens = jnp.asarray(rng.integers(0, 50, size=(2, 24)), jnp.int32)
    outs = []
    for blocks in (1, 3):
        cfg = TransformerConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64,
                                position="t5", query_blocks=blocks)
        m = Transformer(cfg, TokenEmbedding(50, 32, tied=False))
        params = m.init(jax.random.key(1), tokens)
        outs.append(np.asarray(m.apply(params, tokens)[0]))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_wide_matmul_gradients_match_float64_reference():
    """The CPU path for outputs a multiple of 2048 wide (weight gradient on a transposed copy of x) gives
    the plain product's value and gradients."""
    from jaxemb.nn.transformer import _matmul_cpu_wide, matmul
    rng = np.random.default_rng()
    x, w, g = rng.normal(size=(6, 5)), rng.normal(size=(5, 2048)), rng.normal(size=(6, 2048))
    with jax.enable_x64(True):
        for f in (matmul, lambda x, w: matmul(x, w, True), _matmul_cpu_wide):
            y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
            dx, dw = vjp(jnp.asarray(g))
            # atol: entries near zero lose their relative digits to a different summation order
            np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(dx), g @ w.T, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(dw), x.T @ g, rtol=1e-12, atol=1e-12)


# --- the encoder (causal=False) and the config options an ESM2-style port needs ---------------------------

def _np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


_NP_ACT = {"gelu_tanh": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3))),
           "gelu_erf": lambda h: 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2))),
           "relu": lambda h: np.maximum(h, 0)}


def _reference_forward(p, cfg, tokens, seg, key_ok):
    """The Transformer in float64 numpy, written from its definition: logits (B, L, V)."""
    b, l = tokens.shape
    x = p["embed"]["embedding"][tokens]
    pos = np.zeros((b, l), int)
    for i in range(b):
        for t in range(1, l):
            pos[i, t] = pos[i, t - 1] + 1 if seg[i, t] == seg[i, t - 1] else 0
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & key_ok[:, None, :]
    if cfg.causal:
        mask &= np.tril(np.ones((l, l), bool))
    half = cfg.head_dim // 2
    angle = pos[:, None, :, None] * 10000.0 ** (-np.arange(half) / half)  # (B, 1, L, D/2)
    bias = 0.0
    if cfg.position == "t5":
        rel = np.arange(l)[None, :] - np.arange(l)[:, None]
        buckets = np.vectorize(lambda r: _t5_bucket_ref(r, cfg.rel_buckets, cfg.rel_max_distance,
                                                        not cfg.causal))(rel)
        bias = p["rel_bias"]["rel_bias"][buckets].transpose(2, 0, 1)[None]
    dense = lambda h, q, spec: np.einsum(spec, h, q["kernel"]) + (q["bias"] if cfg.use_bias else 0)
    for i in range(cfg.num_layers):
        blk = p[f"block_{i}"]
        h = _np_layer_norm(x, blk["ln_attn"], cfg.norm_eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in np.moveaxis(
            dense(h, blk["attn"]["qkv"], "bld,dthk->blthk"), 2, 0))  # (B, H, L, D) each
        if cfg.position == "rope":
            rot = lambda t: np.concatenate([t[..., :half] * np.cos(angle) - t[..., half:] * np.sin(angle),
                                            t[..., half:] * np.cos(angle) + t[..., :half] * np.sin(angle)], -1)
            q, k = rot(q), rot(k)
        s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(cfg.head_dim) + bias
        e = np.where(mask[:, None], np.exp(s - s.max(-1, keepdims=True)), 0.0)
        probs = e / np.where(e.sum(-1, keepdims=True) > 0, e.sum(-1, keepdims=True), 1.0)
        att = np.einsum("bhqk,bhkd->bqhd", probs, v)
        x = x + dense(att, blk["attn"]["out"], "blhk,hkd->bld")
        h = _np_layer_norm(x, blk["ln_mlp"], cfg.norm_eps)
        x = x + dense(_NP_ACT[cfg.mlp_activation](dense(h, blk["mlp"]["wi"], "bld,dm->blm")),
                      blk["mlp"]["wo"], "blm,md->bld")
    if cfg.final_norm:
        x = _np_layer_norm(x, p["ln_final"], cfg.norm_eps)
    return x @ p["embed"]["head"]["kernel"]


def _random_model(rng, tokens, **kw):
    """A small Transformer with every parameter (biases, LayerNorm scales too) set to fresh random values."""
    base = dict(vocab_size=50, d_model=16, num_layers=2, num_heads=2, head_dim=8, mlp_dim=32)
    cfg = TransformerConfig(**{**base, **kw})
    m = Transformer(cfg, TokenEmbedding(50, 16, tied=False))
    shapes = nn.unbox(m.init(jax.random.key(0), tokens))
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, jnp.float32), shapes)
    return m, cfg, params


ENCODER_CASES = [
    dict(causal=False, position="rope", use_bias=True, mlp_activation="gelu_erf", norm_eps=1e-5),  # ESM2's
    dict(causal=False, position="t5", mlp_activation="relu", final_norm=False),
    dict(causal=False, position="none", use_bias=True),
    dict(causal=True, position="t5", use_bias=True, mlp_activation="gelu_erf"),
    dict(),  # today's decoder defaults
]


@pytest.mark.parametrize("kw", ENCODER_CASES)
def test_transformer_matches_float64_reference(kw):
    """The whole model, encoder or decoder, against a float64 numpy forward, with packed segments, padding
    by segment id 0 and by attention_mask, on fresh random inputs and parameters."""
    rng = np.random.default_rng()
    b, l = 2, 12
    tokens = rng.integers(0, 50, size=(b, l))
    seg = np.array([[1] * 5 + [2] * 5 + [0] * 2, [3] * 12])
    key_ok = np.ones((b, l), bool)
    key_ok[1, 9:] = False  # row 1: padding given by the mask instead
    m, cfg, params = _random_model(rng, jnp.asarray(tokens), **kw)
    out, hidden = m.apply(params, jnp.asarray(tokens), jnp.asarray(seg), attention_mask=jnp.asarray(key_ok))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]
    ref = _reference_forward(p64, cfg, tokens, seg, key_ok)
    valid = (seg > 0) & key_ok
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    assert np.isfinite(np.asarray(out)).all()
    assert len(hidden["layers"]) == cfg.num_layers and hidden["final"].shape == (b, l, 16)


@pytest.mark.parametrize("position", ["rope", "t5", "none"])
def test_encoder_sees_both_ways_ignores_padding_and_packs_segments(position):
    rng = np.random.default_rng()
    tokens = jnp.asarray(rng.integers(0, 50, size=(1, 20)), jnp.int32)
    m, _, params = _random_model(rng, tokens, causal=False, position=position, use_bias=True)
    base, _ = m.apply(params, tokens)
    changed, _ = m.apply(params, tokens.at[0, 15].set((tokens[0, 15] + 1) % 50))
    assert np.abs(np.asarray(changed - base)[0, :15]).max() > 1e-3  # earlier positions see a later token
    # packed: each segment equals the segment run alone
    seg = jnp.asarray([[1] * 8 + [2] * 12], jnp.int32)
    packed, _ = m.apply(params, tokens, seg)
    for lo, hi in ((0, 8), (8, 20)):
        alone, _ = m.apply(params, tokens[:, lo:hi])
        np.testing.assert_allclose(packed[0, lo:hi], alone[0], rtol=1e-5, atol=1e-5)
    # padding (segment 0 or attention_mask False): the valid outputs equal the unpadded run, whatever the
    # padding tokens are
    alone, _ = m.apply(params, tokens[:, :14])
    other = tokens.at[0, 14:].set((tokens[0, 14:] + 7) % 50)
    by_seg, _ = m.apply(params, other, jnp.asarray([[1] * 14 + [0] * 6], jnp.int32))
    by_mask, _ = m.apply(params, other, attention_mask=jnp.arange(20)[None] < 14)
    for padded in (by_seg, by_mask):
        np.testing.assert_allclose(padded[0, :14], alone[0], rtol=1e-5, atol=1e-5)


def test_encoder_config_errors_name_the_field():
    for kw, field in ((dict(causal=False, query_blocks=2), "query_blocks"), (dict(mlp_activation="gelu2"),
                      "mlp_activation"), (dict(speed_paths="gpu"), "speed_paths"), (dict(norm_eps=0.0), "norm_eps")):
        with pytest.raises(ValueError, match=field):
            TransformerConfig(**kw)
    with pytest.raises(ValueError, match="attention_mask"):
        _model().init(jax.random.key(0), jnp.zeros((2, 6), jnp.int32), attention_mask=jnp.ones((2, 5), bool))


# --- speed paths ------------------------------------------------------------------------------------------

def test_auto_speed_paths_are_the_cpu_paths_on_cpu_and_only_the_bias_vjp_elsewhere(monkeypatch):
    from jaxemb.nn.transformer import SpeedPaths, resolve_speed_paths
    assert jax.default_backend() == "cpu"  # the suite runs on (simulated) CPU devices
    assert resolve_speed_paths("auto") == resolve_speed_paths("cpu") == SpeedPaths(True, True, True, True)
    assert resolve_speed_paths("plain") == SpeedPaths()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_speed_paths("auto") == SpeedPaths(shared_bias_vjp=True)


@pytest.mark.parametrize("causal", [True, False])
def test_speed_paths_give_the_plain_values_and_gradients(causal):
    """'cpu' (wide-matmul VJP at MLP width 2048, q/k/v barrier, shared-bias VJP, 2 auto query blocks at length
    128) against 'plain': the same logits and parameter gradients up to float32 rounding."""
    rng = np.random.default_rng()
    b, l = 2, 128
    tokens = jnp.asarray(rng.integers(0, 50, size=(b, l)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 50, size=(b, l)), jnp.int32)
    seg = jnp.asarray([[1] * 50 + [2] * 70 + [0] * 8, [1] * l], jnp.int32)
    results = []
    for paths in ("plain", "cpu"):
        m, _, params = _random_model(np.random.default_rng(0), tokens, mlp_dim=2048, position="t5",
                                     causal=causal, speed_paths=paths)
        loss = lambda p: jnp.sum(m.apply(p, tokens, seg, targets=targets)[0] * (seg > 0))
        results.append((m.apply(params, tokens, seg)[0], jax.grad(loss)(params)))
    (out0, g0), (out1, g1) = results
    np.testing.assert_allclose(np.asarray(out1), np.asarray(out0), rtol=1e-5, atol=1e-5)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5 * np.abs(c).max())

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


def test_t5_buckets_match_reference():
    def ref(rel, nb=32, md=128):
        n = max(-rel, 0)
        exact = nb // 2
        if n < exact:
            return n
        return min(nb - 1, exact + int(np.log(n / exact) / np.log(md / exact) * (nb - exact)))
    rel = np.arange(-400, 5)
    got = np.asarray(t5_bucket(jnp.asarray(rel), 32, 128))
    np.testing.assert_array_equal(got, [ref(int(r)) for r in rel])


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
    from jaxemb.nn.transformer import causal_attention
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
        out = causal_attention(*args, jnp.asarray(mask), jnp.asarray(bias), blocks)
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
        got = jax.grad(lambda *a: jnp.sum(causal_attention(*a[:3], jmask, a[3], blocks) * w),
                       argnums=(0, 1, 2, 3))(*args)
        want = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2, 3))(*args)
        for g1, g2 in zip(got, want):  # q, k, v and the bias shared over the batch
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
        for f in (matmul, _matmul_cpu_wide):
            y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
            dx, dw = vjp(jnp.asarray(g))
            np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(dx), g @ w.T, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(dw), x.T @ g, rtol=1e-12)

"""Query-chunked attention (TransformerConfig.attention_chunk): the same values and gradients as the whole
(L, L) attention, in float64, and less memory where it matters (XLA's own buffer accounting)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.nn.embeddings import TokenEmbedding
from jaxemb.nn.transformer import Transformer, TransformerConfig, chunked_attention, masked_attention


def _reference(q, k, v, mask, bias):
    s = np.where(mask, np.einsum("bhqd,bhkd->bhqk", q, k) + bias, -np.inf)
    peak = np.where(np.isfinite(s.max(-1, keepdims=True)), s.max(-1, keepdims=True), 0)
    e = np.exp(s - peak)
    return np.einsum("bhqk,bhkd->bhqd", e / np.maximum(e.sum(-1, keepdims=True), 1e-300), v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 11, 16])
def test_chunks_match_float64_reference_values_and_gradients(causal, chunk):
    """Packed segments, padding rows, a T5-style bias shared over the batch, lengths not a multiple of the
    chunk (and a chunk longer than the sequence)."""
    rng = np.random.default_rng()
    b, h, l, d = 2, 3, 11, 4
    q, k, v = (rng.normal(size=(b, h, l, d)) for _ in range(3))
    bias = rng.normal(size=(1, h, l, l))
    seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11])
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    if causal:
        mask &= np.tril(np.ones((l, l), bool))[None]
    mask = mask[:, None]
    ref = _reference(q, k, v, mask, bias)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (q, k, v, bias)]
        jmask = jnp.asarray(mask)
        out = chunked_attention(*args[:3], jmask, args[3], chunk)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)
        assert (np.asarray(out)[0, :, 9:] == 0).all()  # padding rows: zeros, not NaN
        w = jnp.asarray(rng.normal(size=ref.shape))
        want = jax.grad(lambda *a: jnp.sum(masked_attention(*a[:3], jmask, a[3]) * w), argnums=(0, 1, 2, 3))(*args)
        for shared_vjp in (False, True):
            got = jax.grad(lambda *a: jnp.sum(chunked_attention(*a[:3], jmask, a[3], chunk, shared_vjp) * w),
                           argnums=(0, 1, 2, 3))(*args)
            for g1, g2 in zip(got, want):  # q, k, v and the bias
                np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-10, atol=1e-12)


def _encoder(chunk, position="rope", layers=2, d=32):
    cfg = TransformerConfig(vocab_size=50, d_model=d, num_layers=layers, num_heads=2, head_dim=d // 2,
                            mlp_dim=2 * d, position=position, causal=False, attention_chunk=chunk)
    return Transformer(cfg, TokenEmbedding(50, d, tied=False))


@pytest.mark.parametrize("position", ["rope", "t5"])
def test_model_outputs_and_gradients_do_not_depend_on_the_chunk(position):
    rng = np.random.default_rng()
    tokens = jnp.asarray(rng.integers(0, 50, size=(2, 23)), jnp.int32)
    seg = jnp.asarray([[1] * 9 + [2] * 10 + [0] * 4, [1] * 23], jnp.int32)
    params = _encoder(0, position).init(jax.random.key(int(rng.integers(1 << 30))), tokens)

    def run(chunk):
        m = _encoder(chunk, position)
        loss = lambda p: jnp.sum(m.apply(p, tokens, seg)[0] ** 2)  # noqa: E731
        return jax.jit(lambda p: (m.apply(p, tokens, seg)[0], jax.grad(loss)(p)))(params)

    (out0, g0), (out1, g1) = run(0), run(6)
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * max(1.0, float(np.abs(b).max())))


def test_chunks_shrink_the_compiled_backward_memory():
    """XLA's buffer assignment for one encoder gradient at L = 1024: the chunked attention needs a fraction
    of the temporary memory of the whole (L, L) scores per layer."""
    tokens = jnp.zeros((1, 1024), jnp.int32)
    params = _encoder(0, layers=4).init(jax.random.key(0), tokens[:, :8])

    def temp_bytes(chunk):
        m = _encoder(chunk, layers=4)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, tokens)[0])))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(128)
    assert chunked < whole / 3, (whole, chunked)


def test_a_negative_chunk_is_refused():
    with pytest.raises(ValueError, match="attention_chunk=-1"):
        TransformerConfig(attention_chunk=-1)

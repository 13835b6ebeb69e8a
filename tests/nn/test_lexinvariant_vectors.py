import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.nn.lexinvariant_vectors import blockwise_nll, sequence_keys, sequence_tables, token_vectors


def _reference(h, table, targets, scale):
    """float64 NLL and its gradient wrt h."""
    logits = np.einsum("bld,bvd->blv", h, table) * scale
    m = logits.max(-1, keepdims=True)
    p = np.exp(logits - m)
    lse = np.log(p.sum(-1)) + m[..., 0]
    p /= p.sum(-1, keepdims=True)
    tgt = np.take_along_axis(table, targets[..., None], axis=1)  # (B, L, d)
    nll = lse - np.einsum("bld,bld->bl", h, tgt) * scale
    grad = (np.einsum("blv,bvd->bld", p, table) - tgt) * scale
    return nll, grad


@pytest.mark.parametrize("vocab,block", [(50, 16), (64, 64), (37, 1), (300, 128)])
def test_blockwise_readout_matches_materialised_in_value_and_gradient(vocab, block):
    rng = np.random.default_rng()
    b, length, dim = 2, 5, 8
    key = jax.random.key(int(rng.integers(1 << 30)))
    h = rng.normal(size=(b, length, dim))
    targets = rng.integers(0, vocab, size=(b, length))
    table = np.asarray(sequence_tables(key, b, vocab, dim), np.float64)
    scale = dim ** -0.5
    ref_nll, ref_grad = _reference(h, table, targets, scale)
    keys = sequence_keys(key, b)
    f = lambda hh: blockwise_nll(hh, keys, jnp.asarray(targets), vocab, block, scale)
    nll = np.asarray(f(jnp.asarray(h, jnp.float32)))
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-4, atol=1e-4)
    grad = np.asarray(jax.grad(lambda hh: f(hh).sum())(jnp.asarray(h, jnp.float32)))
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_rows_do_not_depend_on_how_they_are_generated():
    key = jax.random.key(7)
    keys = sequence_keys(key, 3)
    table = np.asarray(sequence_tables(key, 3, 40, 6))
    ids = np.array([[3, 39, 3, 0], [1, 1, 2, 2], [38, 5, 5, 7]])
    rows = np.asarray(token_vectors(keys, jnp.asarray(ids), 6))
    np.testing.assert_array_equal(rows, np.take_along_axis(table, ids[..., None], axis=1))


def test_blockwise_model_equals_materialised_model():
    from experiments.configs.lexinvariant import get_config
    from jaxemb.models.lexinvariant import LanguageModelTask
    cfg = get_config("tiny")
    cfg.model.kind = "lexinvariant"
    rng = np.random.default_rng()
    tokens = rng.integers(0, 256, size=(2, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((2, 16), np.int32),
             "weights": np.ones((2, 16), np.float32)}
    full = LanguageModelTask(cfg.model, 16)
    params = full.init(jax.random.key(0), batch)
    cfg.model.readout_block = 48
    blocked = LanguageModelTask(cfg.model, 16)
    r = jax.random.key(int(rng.integers(1 << 30)))
    (la, _), ga = jax.value_and_grad(full.loss, has_aux=True)(params, batch, r)
    (lb, _), gb = jax.value_and_grad(blocked.loss, has_aux=True)(params, batch, r)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)

"""ConvBertLayer against Hugging Face's ConvBertLayer on the same random weights (fp32 and float64), its
padding and segment handling (pad rows never reach real positions), dropout, and params_from_hf errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models import convbert as hf_convbert

from jaxemb.nn.convbert import ConvBertLayer, layer_from_hf_config, params_from_hf

D = 32


def _hf_layer(seed=0, dtype=torch.float32):
    """HF layer, 8 heads / head_ratio 2 (4 attention + 4 conv heads of size 4), kernel 7, every weight
    random (the conv bias and LayerNorms too, which a fresh layer leaves at 0 and 1)."""
    config = hf_convbert.ConvBertConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=8, head_ratio=2,
                                        intermediate_size=D // 2, conv_kernel_size=7)
    torch.manual_seed(seed)
    layer = hf_convbert.ConvBertLayer(config).eval().to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.3 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
    return config, layer, state


@functools.partial(jax.jit, static_argnums=0)
def _apply(layer, params, x, mask=None, segment_ids=None):
    """layer.apply, jitted (eager dispatch is slow on this CPU)."""
    return layer.apply({"params": params}, x, mask, segment_ids=segment_ids)


def _hf_run(layer, x):
    with torch.no_grad():
        return layer(torch.from_numpy(np.asarray(x))).numpy()


def _padded(rng, lengths, length, dtype, left=()):
    """x (B, length, D) random at real positions, NaN at pad positions; mask; per-row real slices."""
    x = np.full((len(lengths), length, D), np.nan, dtype)
    mask = np.zeros((len(lengths), length), bool)
    rows = []
    for b, n in enumerate(lengths):
        s = slice(length - n, length) if b in left else slice(0, n)
        x[b, s] = rng.normal(size=(n, D))
        mask[b, s] = True
        rows.append(s)
    return x, mask, rows


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (1, 13), (3, 20)])
def test_matches_hf_unpadded_fp32(shape):
    config, hf, state = _hf_layer()
    layer = layer_from_hf_config(config)
    x = np.random.default_rng(1).normal(size=shape + (D,)).astype(np.float32)
    got = _apply(layer, params_from_hf(state), x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _hf_run(hf, x), atol=1e-5, rtol=0)


def test_padded_batch_matches_hf_per_sequence():
    """Right- and left-padded rows (pads NaN): real positions equal HF on each sequence alone at batch 1."""
    config, hf, state = _hf_layer(seed=2)
    layer = layer_from_hf_config(config)
    x, mask, rows = _padded(np.random.default_rng(3), [16, 9, 3, 1], 16, np.float32, left=(2,))
    got = np.asarray(_apply(layer, params_from_hf(state), x, jnp.asarray(mask)))
    assert np.isfinite(got).all()
    for b, s in enumerate(rows):
        np.testing.assert_allclose(got[b, s], _hf_run(hf, x[b:b + 1, s])[0], atol=1e-5, rtol=0)


def test_hf_reference_itself_leaks_pads_into_the_conv_branch():
    """Why the masking above is needed: HF with its additive attention mask, pads zero, still changes the
    last real positions (conv_out's bias and the conv read the pads); the first ones, out of reach, do not."""
    _, hf, _ = _hf_layer(seed=12, dtype=torch.float64)
    x = np.zeros((1, 12, D))
    x[0, :6] = np.random.default_rng(13).normal(size=(6, D))
    additive = torch.zeros(1, 1, 1, 12, dtype=torch.float64)
    additive[..., 6:] = torch.finfo(torch.float64).min
    with torch.no_grad():
        batched = hf(torch.from_numpy(x), additive).numpy()[0]
    alone = _hf_run(hf, x[:, :6])[0]
    np.testing.assert_allclose(batched[:2], alone[:2], atol=1e-12)   # 3 neighbours each side: no pad reached
    assert np.abs(batched[5] - alone[5]).max() > 1e-3


def test_bfloat16_input_stays_bfloat16_and_close_to_fp32():
    config, _, state = _hf_layer(seed=14)
    layer = layer_from_hf_config(config)
    x, mask, _ = _padded(np.random.default_rng(15), [9, 5], 9, np.float32)
    params = params_from_hf(state)
    want = np.asarray(_apply(layer, params, x, jnp.asarray(mask)))
    got = _apply(layer, params, jnp.asarray(x, jnp.bfloat16), jnp.asarray(mask))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32)[mask], want[mask], atol=0.1)


def test_float64_matches_hf_float64_padded_and_unpadded():
    config, hf, state = _hf_layer(seed=4, dtype=torch.float64)
    layer = layer_from_hf_config(config, param_dtype=jnp.float64)
    x, mask, rows = _padded(np.random.default_rng(5), [12, 7, 4], 12, np.float64)
    with jax.enable_x64(True):
        params = params_from_hf(state)
        got = np.asarray(_apply(layer, params, x, jnp.asarray(mask.astype(np.int32))))
        assert got.dtype == np.float64
        for b, s in enumerate(rows):
            alone = np.asarray(_apply(layer, params, x[b:b + 1, s]))[0]
            np.testing.assert_allclose(got[b, s], alone, atol=1e-12, rtol=0)
            np.testing.assert_allclose(alone, _hf_run(hf, x[b:b + 1, s])[0], atol=1e-12, rtol=0)


def test_pad_garbage_does_not_change_real_positions():
    """Pad rows holding zeros, 1e30 or NaN give bitwise the same real outputs, and finite outputs everywhere;
    the gradient of a masked loss stays finite too."""
    _, _, state = _hf_layer(seed=6)
    layer = ConvBertLayer()
    params = params_from_hf(state, layer=layer)
    x, mask, _ = _padded(np.random.default_rng(7), [10, 4, 0], 10, np.float32)
    outs = []
    for fill in (0.0, 1e30, -1e30, np.nan):
        xf = np.where(mask[..., None], x, np.float32(fill))
        y = np.asarray(_apply(layer, params, xf, jnp.asarray(mask)))
        assert np.isfinite(y).all(), fill
        outs.append(y)
    for y in outs[1:]:
        np.testing.assert_array_equal(y[mask], outs[0][mask])

    def loss(p):
        y = layer.apply({"params": p}, jnp.asarray(x), jnp.asarray(mask))
        return jnp.sum(jnp.where(jnp.asarray(mask)[..., None], y, 0) ** 2)

    grads = jax.jit(jax.grad(loss))(jax.tree.map(jnp.asarray, params))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_segments_packed_in_one_row_equal_each_alone():
    """Two sequences packed in a row with segment_ids (and pads, id 0) equal each run alone, in float64:
    neither the attention nor the convolution crosses a segment boundary."""
    _, _, state = _hf_layer(seed=10, dtype=torch.float64)
    layer = ConvBertLayer(param_dtype=jnp.float64)
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(1, 6, D)), rng.normal(size=(1, 9, D))
    with jax.enable_x64(True):
        params = params_from_hf(state)
        packed = np.concatenate([a, b, np.full((1, 3, D), np.nan)], 1)
        seg = jnp.asarray([[1] * 6 + [2] * 9 + [0] * 3])
        got = np.asarray(_apply(layer, params, packed, segment_ids=seg))
        alone = [np.asarray(_apply(layer, params, s)) for s in (a, b)]
    np.testing.assert_allclose(got[:, :6], alone[0], atol=1e-12, rtol=0)
    np.testing.assert_allclose(got[:, 6:15], alone[1], atol=1e-12, rtol=0)


def test_dropout_off_is_deterministic_on_changes_the_output():
    _, _, state = _hf_layer(seed=11)
    layer = ConvBertLayer(hidden_dropout=0.2, attention_dropout=0.1)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 11, D)), jnp.float32)
    variables = {"params": params_from_hf(state)}
    run = jax.jit(lambda key, det: layer.apply(variables, x, deterministic=det, rngs={"dropout": key}),
                  static_argnums=1)
    key = lambda k: jax.random.key(k, impl="rbg")  # noqa: E731  (cheaper to compile than threefry)
    plain = jax.jit(lambda: layer.apply(variables, x))()
    np.testing.assert_array_equal(plain, run(key(5), True))
    drop = lambda k: run(key(k), False)  # noqa: E731
    np.testing.assert_array_equal(drop(1), drop(1))
    assert np.abs(np.asarray(drop(1) - plain)).max() > 1e-2
    assert np.abs(np.asarray(drop(1) - drop(2))).max() > 1e-2
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: layer.apply(variables, x, deterministic=False))


def test_params_carry_logical_axes_and_torch_default_init():
    layer = ConvBertLayer()
    params = jax.jit(layer.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 64)))["params"]
    sa = params["self_attention"]
    assert sa["query"]["kernel"].names == ("embed", "heads", "kv")
    assert params["intermediate"]["kernel"].names == ("embed", "mlp")
    assert params["output"]["dense"]["kernel"].names == ("mlp", "embed")
    assert all(isinstance(p, nn.Partitioned) for p in jax.tree.leaves(params, is_leaf=lambda p: isinstance(
        p, nn.Partitioned)))
    p = nn.unbox(params)
    assert p["self_attention"]["query"]["kernel"].shape == (64, 4, 8)       # 4 heads of size 64 / 8
    assert p["output"]["dense"]["kernel"].shape == (32, 64)                 # intermediate 64 / 2
    assert np.abs(p["self_attention"]["query"]["kernel"]).max() <= 1 / 8    # U(+-1/sqrt(64))
    assert 0.015 < np.std(p["self_attention"]["key_conv_pointwise"]) < 0.025  # N(0, 0.02)
    assert not np.any(p["self_attention"]["key_conv_bias"])


def test_params_from_hf_errors_name_the_weight():
    _, _, state = _hf_layer()
    prefixed = {"convbert_layer." + k: v for k, v in state.items()}
    prefixed["output.weight"] = np.zeros((1, D))   # outside the prefix: ignored
    got = params_from_hf(prefixed, "convbert_layer.")
    want = params_from_hf(state)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))

    missing = dict(state)
    del missing["attention.self.conv_out_layer.bias"]
    with pytest.raises(ValueError, match=r"missing: attention\.self\.conv_out_layer\.bias"):
        params_from_hf(missing)
    with pytest.raises(ValueError, match=r"unexpected: p\.attention\.self\.extra\.weight"):
        params_from_hf({"p." + k: v for k, v in {**state, "attention.self.extra.weight": np.zeros(2)}.items()}, "p.")
    bad = {**state, "attention.self.key_conv_attn_layer.bias": np.zeros((D // 2,))}
    with pytest.raises(ValueError, match=r"wrong shape: attention\.self\.key_conv_attn_layer\.bias \(16,\) "
                                         r"\(expected \(16, 1\)\)"):
        params_from_hf(bad)
    with pytest.raises(ValueError, match=r"attention\.self\.query\.weight \(missing\)"):
        params_from_hf({k: v for k, v in state.items() if "query.weight" not in k})
    with pytest.raises(ValueError, match="kernel_size: layer 5, state dict 7"):
        params_from_hf(state, layer=ConvBertLayer(kernel_size=5))


def test_bad_inputs_and_configs_raise_clear_errors():
    x = jnp.zeros((2, 5, D))
    with pytest.raises(ValueError, match="kernel_size=6"):
        ConvBertLayer(kernel_size=6).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="hidden size 30"):
        ConvBertLayer().init(jax.random.key(0), jnp.zeros((1, 5, 30)))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        ConvBertLayer().init(jax.random.key(0), x, jnp.ones((2, 4), bool))
    config = hf_convbert.ConvBertConfig(hidden_size=D, num_groups=2)
    with pytest.raises(ValueError, match="num_groups=2"):
        layer_from_hf_config(config)

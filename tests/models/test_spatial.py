import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxemb.models import spatial as S
from jaxemb.train import Trainer, core_config
from jaxemb.train.metrics import read_metrics
from helpers import ArraySource


def _points(rng, n):
    """Random points plus both poles, the antimeridian from both sides, and the origin."""
    pts = np.c_[rng.uniform(-180, 180, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))]
    edge = [[0, 90], [37, -90], [180, 12], [-180, 12], [179.9999, -45], [-180, 90], [0, 0]]
    return np.r_[pts, edge]


def _scipy_real_sh(lonlat, L):
    """float64 real spherical harmonics from scipy's complex ones (which carry the Condon-Shortley phase)."""
    theta, phi = np.deg2rad(90 - lonlat[:, 1]), np.deg2rad(lonlat[:, 0])
    out = []
    for l in range(L):
        for m in range(-l, l + 1):
            y = sp.sph_harm_y(l, abs(m), theta, phi)
            out.append(y.real if m == 0 else math.sqrt(2) * (-1) ** abs(m) * (y.real if m > 0 else y.imag))
    return np.stack(out, 1)


# -- spherical harmonics --------------------------------------------------------------------------------


def test_spherical_harmonics_match_scipy_for_all_degrees_below_64():
    pts = _points(np.random.default_rng(1), 40)
    ref = _scipy_real_sh(pts, 64)
    host = S.spherical_harmonics(pts, 64)
    assert host.shape == (len(pts), 64 * 64) and host.dtype == np.float64
    np.testing.assert_allclose(host, ref, atol=1e-11)
    with jax.enable_x64(True):
        y64 = np.asarray(S.spherical_harmonics_jnp(jnp.asarray(pts), 64))
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, ref, atol=1e-11)
    y32 = np.asarray(S.spherical_harmonics_jnp(jnp.asarray(pts, jnp.float32), 64))
    assert np.isfinite(y32).all()
    np.testing.assert_allclose(y32, ref, atol=5e-4)  # float32 angles: m * phi up to 63 * pi


def test_spherical_harmonics_are_orthonormal_by_quadrature():
    L = 32
    x, wx = np.polynomial.legendre.leggauss(L + 1)  # exact for the degree-2L-2 products in cos(theta)
    nphi = 2 * L + 1
    lat = np.degrees(np.arcsin(x))
    lon = -180 + 360 * np.arange(nphi) / nphi
    grid = np.stack(np.meshgrid(lon, lat), -1).reshape(-1, 2)
    w = np.repeat(wx, nphi) * (2 * np.pi / nphi)
    y = S.spherical_harmonics(grid, L)
    gram = y.T @ (y * w[:, None])
    np.testing.assert_allclose(gram, np.eye(L * L), atol=1e-12)


def test_first_harmonics_fix_the_lon_lat_order():
    """Y_1,-1, Y_1,0, Y_1,1 = sqrt(3 / 4pi) * (cos lat sin lon, sin lat, cos lat cos lon)."""
    c = math.sqrt(3 / (4 * math.pi))
    y = S.spherical_harmonics([[90.0, 0.0], [0.0, 90.0], [0.0, 0.0]], 2)
    np.testing.assert_allclose(y[:, 1:], c * np.eye(3), atol=1e-15)
    np.testing.assert_allclose(y[:, 0], 1 / math.sqrt(4 * math.pi))


# -- coordinates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ([[100.0, 95.0], [0.0, 0.0]], r"latitudes \(column 1\) outside \[-90, 90\]: \[95\.\]"),
    ([[190.0, 10.0]], r"longitudes \(column 0\) outside \[-180, 180\]"),
    ([[10.0, np.nan]], "NaN"),
    ([[37.8, -122.4], [34.0, -118.2]], r"look swapped.*expected columns \(lon, lat\)"),
    ([[1.0, 2.0, 3.0]], r"shape \(N, 2\)"),
])
def test_bad_coordinates_are_refused_at_every_entry_point(small_task, bad, match):
    with pytest.raises(ValueError, match="coords.*" + match):
        S.check_lonlat(bad, "coords")
    with pytest.raises(ValueError, match=match):
        S.spherical_harmonics(bad, 4)
    with pytest.raises(ValueError, match=match):
        S.spherical_harmonics_jnp(jnp.asarray(bad, jnp.float32), 4)
    task, params = small_task
    with pytest.raises(ValueError, match=match):
        task.model.init(jax.random.key(0), jnp.asarray(bad, jnp.float32), method=S.SpatialModel.locate)
    with pytest.raises(ValueError, match=match):
        task.embed(params, bad)


@pytest.fixture(scope="module")
def small_task():
    task = S.SpatialTask(_cfg(views=("map",)))  # the one-view ablation
    return task, nn.unbox(jax.jit(task.init)(jax.random.key(0), _batch(np.random.default_rng(0), 8, ("map",))))


# -- SIREN ----------------------------------------------------------------------------------------------


def test_siren_init_statistics():
    """Weights and biases ~ U(-1/n, 1/n) on the first layer, U(-sqrt(6/n)/w0, +) after; a hidden sine
    layer fed arcsine-distributed inputs has pre-activations w0 (x W + b) of variance ~1 (SIREN's claim)."""
    enc = S.LocationEncoder(legendre=10, hidden=128, layers=2, dim=16, w0_first=30.0, w0=1.0)
    params = enc.init(jax.random.key(3), jnp.zeros((4, 2)))["params"]
    bounds = {"siren_0": 1 / 100, "siren_1": math.sqrt(6 / 128), "out": math.sqrt(6 / 128)}
    for name, bound in bounds.items():
        for leaf in ("kernel", "bias"):
            v = np.asarray(params[name][leaf].unbox()).ravel()
            assert np.abs(v).max() <= bound
            assert abs(v.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), (name, leaf)
            assert abs(v.mean()) < 0.1 * bound
    w = np.asarray(params["siren_1"]["kernel"].unbox(), np.float64)
    b = np.asarray(params["siren_1"]["bias"].unbox(), np.float64)
    x = np.sin(np.random.default_rng(0).uniform(-np.pi, np.pi, (4096, 128)))
    pre = x @ w + b
    assert abs(pre.var() - 1.0) < 0.1


# -- InfoNCE --------------------------------------------------------------------------------------------


def _info_nce_np(v, z, log_scale, w):
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = np.exp(log_scale) * v @ z.T
    keep = w > 0
    total = 0.0
    for lg in (logits, logits.T):
        lg = lg[np.ix_(keep, keep)]
        m = lg.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lg - m).sum(1))
        total += np.sum((lse - np.diag(lg)) * w[keep]) / w.sum() / 2
    return total


def test_info_nce_matches_float64_reference():
    rng = np.random.default_rng(7)
    for n, d, padded in [(16, 8, 0), (24, 16, 5)]:
        v, z = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        z[:4] = v[:4] + 0.1 * rng.normal(size=(4, d))  # some easy positives
        w = np.ones(n)
        w[n - padded:] = 0
        log_scale = rng.uniform(0, math.log(1 / 0.07))
        got, metrics = S.info_nce(jnp.asarray(v, jnp.float32), jnp.asarray(z, jnp.float32),
                                  jnp.float32(log_scale), jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(float(got), _info_nce_np(v, z, log_scale, w), rtol=2e-5)
        assert 0 < float(metrics["accuracy"]) <= 1


def test_info_nce_uses_the_global_batch_on_eight_devices():
    rng = np.random.default_rng(8)
    v, z = (jnp.asarray(rng.normal(size=(32, 8)), jnp.float32) for _ in range(2))
    one = S.info_nce(v, z, jnp.float32(2.0))[0]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P("data", None))
    fn = jax.jit(lambda a, b: S.info_nce(a, b, jnp.float32(2.0))[0], in_shardings=(sh, sh))
    eight = fn(jax.device_put(v, sh), jax.device_put(z, sh))
    np.testing.assert_allclose(float(eight), float(one), rtol=1e-6)
    # one device's shard alone gives a different (local) loss: the sharded one really is global
    assert abs(float(S.info_nce(v[:4], z[:4], jnp.float32(2.0))[0]) - float(one)) > 1e-3


def test_task_loss_with_dropout_is_the_same_on_one_and_eight_devices(small_task):
    task, params = small_task
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(5), 32, ("map",)).items()}
    rng = jax.random.key(11)
    one = jax.jit(task.loss)(params, batch, rng)[0]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("data", *([None] * (v.ndim - 1))))) for k, v in batch.items()}
    eight = jax.jit(task.loss)(params, sharded, rng)[0]
    np.testing.assert_allclose(float(eight), float(one), rtol=1e-5)
    assert float(jax.jit(task.loss)(params, batch, jax.random.key(12))[0]) != float(one)  # dropout is on


# -- hex grid and map view ------------------------------------------------------------------------------


def test_hex_disk_has_37_cells_and_kernel_covers_exactly_the_hex_neighbours():
    disk = S.hex_disk_mask(3)
    assert disk.shape == (7, 7) and disk.sum() == 37
    kernel = S.hex_disk_mask(1)
    assert kernel.sum() == 7 and not kernel[0, 0] and not kernel[2, 2] and kernel[0, 2] and kernel[2, 0]
    conv = S.HexConv(1)
    params = conv.init(jax.random.key(0), jnp.zeros((1, 7, 7, 1)))
    params = jax.tree.map(lambda x: jnp.ones_like(x), nn.unbox(params))
    params["params"]["bias"] = jnp.zeros((1,))
    r, q = np.mgrid[-3:4, -3:4]
    for cr, cq in [(0, 0), (1, -2), (-1, 2), (2, 1)]:
        delta = np.zeros((1, 7, 7, 1), np.float32)
        delta[0, cr + 3, cq + 3, 0] = 1
        out = np.asarray(conv.apply(params, jnp.asarray(delta)))[0, :, :, 0]
        assert np.array_equal(out > 0.5, S.hex_distance(q, r, cq, cr) <= 1), (cr, cq)
    inner = (S.hex_distance(q, r, 0, 0) <= 2)
    counts = [(S.hex_distance(q, r, qq, rr) == 1).sum() for qq, rr in zip(q[inner], r[inner])]
    assert set(counts) == {6}


def test_map_view_batch_norm_uses_valid_cells_and_keeps_outside_cells_zero():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.gamma(2.0, size=(16, 7, 7, 3)), jnp.float32)
    bn = S.MaskedBatchNorm()
    mask = S.hex_disk_mask(3)
    p = bn.init(jax.random.key(0), x, mask)
    y = np.asarray(jax.jit(lambda p, x: bn.apply(p, x, mask))(p, x), np.float64)
    xs = np.asarray(x, np.float64)[:, mask]
    ref = (xs - xs.mean((0, 1))) / np.sqrt(xs.var((0, 1)) + 1e-5)
    np.testing.assert_allclose(y[:, mask], ref, atol=1e-4)
    view = S.MapView(16)
    vp = jax.jit(view.init)(jax.random.key(1), x)
    out = jax.jit(view.apply)(vp, x)
    assert out.shape == (16, 16) and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match=r"map view must have shape \(B, 7, 7, C\)"):
        view.apply(vp, x[:, :5])


# -- the task through the training core -----------------------------------------------------------------


def _cfg(**kw):
    c = S.default_config()
    c.update(dict(dict(legendre=6, dim=8), **kw))
    return c


def _field(lonlat, channels, freq):
    """A smooth, location-specific signal: what the views see at each place."""
    lon, lat = np.deg2rad(lonlat[..., 0]), np.deg2rad(lonlat[..., 1])
    return np.stack([np.sin(freq * (k + 1) * lon + k) * np.cos(freq * (k + 2) * lat - k) for k in range(channels)], -1)


def _batch(rng, n, views=("image", "map")):
    ll = np.c_[rng.uniform(-180, 180, n), rng.uniform(-60, 60, n)]
    out = {"lonlat": ll.astype(np.float32)}
    off = np.stack(np.meshgrid(np.arange(-3, 4), np.arange(-3, 4)), -1) * 2.0  # cells 2 degrees apart
    if "map" in views:
        out["map"] = _field(ll[:, None, None, :] + off, 3, 2.0).astype(np.float32)
    if "image" in views:
        out["image"] = _field(ll[:, None, None, :] + off[:6, :6], 2, 2.0).astype(np.float32)
    return out


def _train_cfg(steps, shape, n):
    c = core_config()
    c.train.update(steps=steps, batch_size=32, log_every=1, checkpoint_every=0, progress=False)
    c.optim.update(warmup_steps=0, lr=3e-3, schedule="constant")
    c.mesh.shape, c.mesh.num_devices = shape, n
    return c


def _losses(workdir):
    return [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")]


def test_one_and_eight_devices_give_same_losses_and_training_lowers_the_loss(tmp_path):
    """The same first steps on 1 device and on a batch-sharded (data 4 x fsdp 2) mesh of 8; the 8-device
    run then trains on: the contrastive loss falls well below chance, log(batch)."""
    data = _batch(np.random.default_rng(0), 256)
    task = S.SpatialTask(_cfg(legendre=10, dropout=0.0))  # dropout 0.5 needs far more than 40 steps
    losses, states = {}, {}
    for name, shape, n, steps in [("one", dict(data=1, fsdp=1, tensor=1), 1, 2),
                                  ("eight", dict(data=4, fsdp=2, tensor=1), 8, 40)]:
        tr = Trainer(task, _train_cfg(steps, shape, n), str(tmp_path / name))
        states[name] = tr.fit(ArraySource(data, 32)).state
        losses[name] = _losses(str(tmp_path / name))
    assert len(losses["one"]) == 2 and len(losses["eight"]) == 40
    np.testing.assert_allclose(losses["eight"][:2], losses["one"], rtol=2e-5)
    first, last = np.mean(losses["eight"][:3]), np.mean(losses["eight"][-5:])
    assert last < math.log(32) - 1.5 < first, losses["eight"]  # well beyond chance (log 32)
    emb = task.embed(states["eight"]["params"], data["lonlat"][:10])
    assert emb.shape == (10, 8) and np.isfinite(emb).all()


def test_weight_decay_mask_spares_biases_norms_and_temperature(small_task):
    task, params = small_task
    mask = task.decay_mask(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["params/location/siren_0/kernel"] and flat["params/map/conv_1/kernel"]
    assert "params/image/proj/kernel" not in flat
    assert not flat["params/log_scale"] and not flat["params/location/siren_0/bias"]
    assert not flat["params/map/bn_0/scale"] and not flat["params/fuse_norm/scale"]
    assert sum(flat.values()) == sum(k.endswith("kernel") for k in flat)
    assert math.isclose(float(params["params"]["log_scale"]), math.log(1 / 0.07), rel_tol=1e-6)
    # the mask as optax's AdamW takes it: with zero gradients only the kernels shrink
    import optax
    tx = optax.adamw(0.1, weight_decay=0.01, mask=task.decay_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
    assert jax.tree.leaves(moved) == [bool(m) and bool(jnp.any(p != 0)) for m, p in
                                      zip(jax.tree.leaves(mask), jax.tree.leaves(params))]


def test_views_are_optional_but_not_empty():
    with pytest.raises(ValueError, match="model.views"):
        S.SpatialTask(_cfg(views=())).init(jax.random.key(0), _batch(np.random.default_rng(0), 4))
    with pytest.raises(KeyError, match="'image'"):
        S.SpatialTask(_cfg(views=("image",))).init(jax.random.key(0), _batch(np.random.default_rng(0), 4, ("map",)))

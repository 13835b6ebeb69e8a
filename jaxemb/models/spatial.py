"""Multi-view contrastive spatial embeddings (Holvoet, Antonio, Henckaerts et al. 2025, built on SatCLIP).

A location encoder maps (lon, lat) in degrees to a d-dimensional embedding:

  (lon, lat) -> real spherical harmonics Y_lm, l < L (L^2 features) -> SIREN (2 x 128 sine layers,
  w0 = 30 on the first, 1 after, dropout 0.5 on the pre-activations) -> Linear to d.

During pretraining it is aligned with a fused embedding of views at the same place (an image tile and a
map-count tensor on a hexagonal disk) by a symmetric InfoNCE loss over the whole global batch; afterwards
only the location encoder is kept (`SpatialTask.embed`).

Coordinates are always (lon, lat), in that column order, in degrees: lon in [-180, 180], lat in [-90, 90].
`check_lonlat` enforces it wherever coordinates enter with concrete values (host calls; inside jit the
data source must have checked them).

Spherical harmonics use the colatitude theta = 90 - lat and azimuth phi = lon, orthonormal on the unit
sphere, without the Condon-Shortley phase:
  Y_l0 = P_l0(cos theta),  Y_lm = sqrt(2) P_lm(cos theta) cos(m phi),  Y_l,-m = sqrt(2) P_lm sin(m phi)
where P_lm are the fully normalised associated Legendre functions, computed by the standard stable
recurrence (never a closed form, which loses all digits past L ~ 30-50):
  P_mm = c_m sin^m theta,  c_m = sqrt(1 / 4pi) prod_{k<=m} sqrt((2k + 1) / 2k)
  P_lm = a_lm (cos theta P_{l-1,m} - b_lm P_{l-2,m}),  a_lm = sqrt((4l^2 - 1) / (l^2 - m^2)),
                                                    b_lm = sqrt(((l-1)^2 - m^2) / (4(l-1)^2 - 1))
Features are ordered l = 0..L-1, and within l, m = -l..l (as SatCLIP orders them). The reference uses
phi = lon + 180 and theta = lat + 90, which only flips the sign of some features.

BatchNorm in the map view uses the statistics of the current (global) batch, in training and evaluation
alike: the training core has no mutable state outside the params, and the location encoder, the only part
kept, has no BatchNorm. Weight decay applies to kernels only (`SpatialTask.decay`).
"""
from __future__ import annotations

import math
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# ---------------------------------------------------------------------------------------------------------
# coordinates


def check_lonlat(lonlat, name: str = "lonlat") -> np.ndarray:
    """Returns `lonlat` as a float64 (N, 2) numpy array of (lon, lat) degrees, or raises ValueError naming
    `name`: wrong shape, NaN/inf, lat outside [-90, 90], lon outside [-180, 180], or columns that look
    swapped (the second column leaves [-90, 90] while the first stays inside it)."""
    a = np.asarray(lonlat, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) with columns (lon, lat) in degrees; got shape {a.shape}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} rows with NaN or infinite coordinates (first: row "
                         f"{int(np.argmax(bad))}); expected finite (lon, lat) degrees")
    lon, lat = a[:, 0], a[:, 1]
    if np.abs(lat).max(initial=0) > 90:
        hint = ""
        if np.abs(lon).max(initial=0) <= 90 and np.abs(lat).max() <= 180:
            hint = ("; the columns look swapped (the first stays within [-90, 90]): expected columns "
                    "(lon, lat), not (lat, lon)")
        raise ValueError(f"{name} has latitudes (column 1) outside [-90, 90]: {lat[np.abs(lat) > 90][:5]}{hint}")
    if np.abs(lon).max(initial=0) > 180:
        raise ValueError(f"{name} has longitudes (column 0) outside [-180, 180]: {lon[np.abs(lon) > 180][:5]}; "
                         "expected degrees east in [-180, 180]")
    return a


def _concrete(x):
    """x as a numpy array, or None when it is a tracer (inside jit: nothing to check)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------------------
# spherical harmonics


@lru_cache(maxsize=None)
def _legendre_tables(L: int):
    """float64 numpy (a (L, L), b (L, L), c (L,)) of the recurrence above; a = b = 0 where m >= l."""
    l = np.arange(L, dtype=np.float64)[:, None]
    m = np.arange(L, dtype=np.float64)[None, :]
    low = m < l
    safe = lambda v: np.where(low, v, 1.0)
    a = np.where(low, np.sqrt(safe((4 * l * l - 1) / safe(l * l - m * m))), 0.0)
    b = np.where(low, np.sqrt(np.maximum(((l - 1) ** 2 - m * m) / safe(4 * (l - 1) ** 2 - 1), 0.0)), 0.0)
    k = np.arange(1, L, dtype=np.float64)
    c = np.sqrt(1 / (4 * np.pi)) * np.concatenate([[1.0], np.cumprod(np.sqrt((2 * k + 1) / (2 * k)))])
    return a, b, c


@lru_cache(maxsize=None)
def _feature_index(L: int):
    """For feature (l, m), m = -l..l: flat index l * L + |m| into P, the trig column, and its scale."""
    rows, cols, scale = [], [], []
    for l in range(L):
        for m in range(-l, l + 1):
            rows.append(l * L + abs(m))
            cols.append(m if m >= 0 else L - 1 + abs(m))  # trig = [cos(0..L-1) phi, sin(1..L-1) phi]
            scale.append(1.0 if m == 0 else math.sqrt(2.0))
    return np.array(rows), np.array(cols), np.array(scale)


def _harmonics(lon_deg, lat_deg, L: int, xp):
    """Real spherical harmonics (N, L^2) of degree < L in xp (numpy or jax.numpy) at the inputs' dtype."""
    if L < 1:
        raise ValueError(f"the number of degrees L must be >= 1, got {L}")
    dtype = lat_deg.dtype
    lat, phi = xp.deg2rad(lat_deg), xp.deg2rad(lon_deg)
    x, s = xp.sin(lat), xp.cos(lat)  # cos and sin of the colatitude
    a, b, c = (t.astype(dtype) for t in _legendre_tables(L))
    m = np.arange(L)
    pmm = c * s[:, None] ** m.astype(dtype)  # P_mm (N, L); 0 ** 0 == 1 at the poles
    prev1 = prev2 = xp.zeros_like(pmm)
    rows = []
    for l in range(L):
        cur = a[l] * (x[:, None] * prev1 - b[l] * prev2)  # zero where m >= l (a = 0 there)
        cur = xp.where(m == l, pmm, cur)
        rows.append(cur)
        prev2, prev1 = prev1, cur
    p = xp.stack(rows, axis=1).reshape(lat.shape[0], L * L)  # P[n, l * L + m]
    mphi = phi[:, None] * m.astype(dtype)
    trig = xp.concatenate([xp.cos(mphi), xp.sin(mphi[:, 1:])], axis=1)
    rows_i, cols_i, scale = _feature_index(L)
    return p[:, rows_i] * trig[:, cols_i] * scale.astype(dtype)


def spherical_harmonics(lonlat, L: int, name: str = "lonlat") -> np.ndarray:
    """Host version in float64: (N, 2) (lon, lat) degrees -> (N, L^2) numpy float64."""
    a = check_lonlat(lonlat, name)
    return _harmonics(a[:, 0], a[:, 1], L, np)


def spherical_harmonics_jnp(lonlat, L: int):
    """In-graph version (jit, grad): (N, 2) (lon, lat) degrees -> (N, L^2) at the input's float dtype
    (float64 when x64 is enabled and the input is float64). Checks concrete inputs like check_lonlat."""
    if lonlat.ndim != 2 or lonlat.shape[-1] != 2:
        raise ValueError(f"lonlat must have shape (N, 2) with columns (lon, lat); got shape {lonlat.shape}")
    host = _concrete(lonlat)
    if host is not None:
        check_lonlat(host)
    lonlat = jnp.asarray(lonlat)
    if not jnp.issubdtype(lonlat.dtype, jnp.floating):
        lonlat = lonlat.astype(jnp.float32)
    return _harmonics(lonlat[:, 0], lonlat[:, 1], L, jnp)


# ---------------------------------------------------------------------------------------------------------
# hexagonal disk (axial coordinates)


def hex_disk_mask(k: int) -> np.ndarray:
    """(2k+1, 2k+1) bool: cell [r + k, q + k] holds axial hex (q, r) when its hex distance
    max(|q|, |r|, |q + r|) <= k. k = 3 gives 37 cells; k = 1 is the 7-cell kernel mask, whose corners
    (-1, -1) and (+1, +1) in (row, col) offsets are not hex neighbours."""
    if k < 0:
        raise ValueError(f"hex disk radius k must be >= 0, got {k}")
    r, q = np.mgrid[-k:k + 1, -k:k + 1]
    return np.maximum(np.maximum(np.abs(q), np.abs(r)), np.abs(q + r)) <= k


def hex_distance(q1, r1, q2, r2):
    dq, dr = np.asarray(q1) - q2, np.asarray(r1) - r2
    return np.maximum(np.maximum(np.abs(dq), np.abs(dr)), np.abs(dq + dr))


# ---------------------------------------------------------------------------------------------------------
# layers


def _uniform(bound: float, axes):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.with_logical_partitioning(init, axes)


def _dense(features, axes, name):
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


class SineLayer(nn.Module):
    """sin(w0 * dropout(x W + b)); SIREN's init: W, b ~ U(-1/n, 1/n) on the first layer and
    U(-sqrt(6/n)/w0, sqrt(6/n)/w0) after, n = fan-in. activation=False gives the plain last layer."""
    features: int
    w0: float = 1.0
    first: bool = False
    dropout: float = 0.0
    activation: bool = True
    axes: tuple = (None, None)

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = x.shape[-1]
        bound = 1.0 / n if self.first else math.sqrt(6.0 / n) / self.w0
        w = self.param("kernel", _uniform(bound, self.axes), (n, self.features))
        b = self.param("bias", _uniform(bound, self.axes[-1:]), (self.features,))
        y = x @ w.astype(x.dtype) + b.astype(x.dtype)
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return jnp.sin(self.w0 * y) if self.activation else y


class LocationEncoder(nn.Module):
    """(B, 2) (lon, lat) degrees -> (B, dim): spherical harmonics of degree < legendre, then a SIREN."""
    legendre: int = 10
    hidden: int = 128
    layers: int = 2
    dim: int = 16
    w0_first: float = 30.0
    w0: float = 1.0
    dropout: float = 0.5

    @nn.compact
    def __call__(self, lonlat, train: bool = False):
        x = spherical_harmonics_jnp(lonlat, self.legendre).astype(jnp.float32)
        for i in range(self.layers):
            x = SineLayer(self.hidden, self.w0_first if i == 0 else self.w0, first=i == 0, dropout=self.dropout,
                          axes=(None, "mlp") if i == 0 else ("embed", "mlp"), name=f"siren_{i}")(x, train)
        return SineLayer(self.dim, self.w0, activation=False, axes=("mlp", None), name="out")(x)


class ImageView(nn.Module):
    """(B, H, W, C) tile -> (B, dim): two ReLU 3x3 convs (stride 2), mean pool, Linear, LayerNorm."""
    dim: int = 32
    channels: tuple = (16, 32)

    @nn.compact
    def __call__(self, x):
        for i, ch in enumerate(self.channels):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=2, padding="SAME", name=f"conv_{i}")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.LayerNorm(name="norm")(_dense(self.dim, (None, None), "proj")(x))


class HexConv(nn.Module):
    """3x3 convolution on an axial hex grid: the kernel's two non-neighbour corners are masked to zero."""
    features: int

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   (None, None, None, None)),
                            (3, 3, cin, self.features))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (self.features,))
        kernel = kernel * jnp.asarray(hex_disk_mask(1), kernel.dtype)[:, :, None, None]
        y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(x.dtype)


class MaskedBatchNorm(nn.Module):
    """Per-channel normalisation by the batch's mean and variance over the valid cells `mask` (H, W)."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, mask):
        ch = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (ch,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (ch,))
        w = jnp.asarray(mask, x.dtype)[None, :, :, None]
        count = x.shape[0] * jnp.sum(w)
        mean = jnp.sum(x * w, axis=(0, 1, 2)) / count
        var = jnp.sum(jnp.square(x - mean) * w, axis=(0, 1, 2)) / count
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class MapView(nn.Module):
    """(B, 2k+1, 2k+1, C) counts on a hex disk of radius k -> (B, dim): hex convs (16, 8) each with
    BatchNorm and ReLU, cells outside the disk kept at zero, then Linear and LayerNorm."""
    dim: int = 16
    channels: tuple = (16, 8)
    radius: int = 3

    @nn.compact
    def __call__(self, x):
        side = 2 * self.radius + 1
        if x.shape[1:3] != (side, side):
            raise ValueError(f"map view must have shape (B, {side}, {side}, C) for a hex disk of radius "
                             f"{self.radius}; got {x.shape}")
        mask = hex_disk_mask(self.radius)
        keep = jnp.asarray(mask, x.dtype)[None, :, :, None]
        x = x * keep
        for i, ch in enumerate(self.channels):
            x = HexConv(ch, name=f"conv_{i}")(x)
            x = nn.relu(MaskedBatchNorm(name=f"bn_{i}")(x, mask)) * keep
        x = x.reshape(x.shape[0], -1)
        return nn.LayerNorm(name="norm")(_dense(self.dim, (None, None), "proj")(x))


class SpatialModel(nn.Module):
    """Location encoder + the views named in `views` (a subset of ('image', 'map')) + fusion + temperature.

    __call__(batch, train) -> (location embeddings (B, d), fused view embeddings (B, d), log_scale)."""
    cfg: ml_collections.ConfigDict

    def setup(self):
        c = self.cfg
        if not c.views or set(c.views) - {"image", "map"}:
            raise ValueError(f"model.views={tuple(c.views)!r}; expected a non-empty subset of ('image', 'map')")
        self.location = LocationEncoder(c.legendre, c.hidden, c.layers, c.dim, c.w0_first, c.w0, c.dropout)
        if "image" in c.views:
            self.image = ImageView(c.image_dim)
        if "map" in c.views:
            self.map = MapView(c.map_dim, radius=c.hex_radius)
        self.fuse_hidden = _dense(c.fusion_hidden, (None, "mlp"), "fuse_hidden")
        self.fuse_out = _dense(c.dim, ("mlp", None), "fuse_out")
        self.fuse_norm = nn.LayerNorm()
        self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1 / 0.07)), ()), ())

    def locate(self, lonlat, train: bool = False):
        return self.location(lonlat, train)

    def views(self, batch):
        parts = []
        for v in ("image", "map"):
            if v in self.cfg.views:
                if v not in batch:
                    raise KeyError(f"model.views includes {v!r} but the batch has only {sorted(batch)}")
                parts.append((self.image if v == "image" else self.map)(batch[v].astype(jnp.float32)))
        x = jnp.concatenate(parts, axis=-1)
        return self.fuse_norm(self.fuse_out(nn.relu(self.fuse_hidden(x))))

    def __call__(self, batch, train: bool = False):
        return self.locate(batch["lonlat"], train), self.views(batch), self.log_scale


# ---------------------------------------------------------------------------------------------------------
# loss


def _normalize(x, eps=1e-12):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def info_nce(views, locations, log_scale, weights=None):
    """Symmetric InfoNCE over the whole (global) batch: row i of `views` (B, d) and of `locations` (B, d)
    are the positive pair, every other row a negative. Both are L2-normalised; logits = exp(log_scale) *
    cosine similarity. Rows with weight 0 (padding) are neither anchors nor negatives.
    Returns (loss, metrics: retrieval accuracy of both directions, the logit scale)."""
    v = _normalize(views.astype(jnp.float32))
    z = _normalize(locations.astype(jnp.float32))
    scale = jnp.exp(log_scale.astype(jnp.float32))
    logits = scale * (v @ z.T)
    n = logits.shape[0]
    w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    valid = w > 0
    total = jnp.maximum(jnp.sum(w), 1e-9)
    diag = jnp.diagonal(logits)
    loss, correct = 0.0, 0.0
    for lg in (logits, logits.T):  # views -> locations, locations -> views
        lg = jnp.where(valid[None, :], lg, -1e9)
        per_row = jax.nn.logsumexp(lg, axis=1) - diag
        loss = loss + jnp.sum(jnp.where(valid, per_row, 0.0) * w) / total / 2
        hit = jnp.argmax(lg, axis=1) == jnp.arange(n)
        correct = correct + jnp.sum(jnp.where(valid, hit, False) * w) / total / 2
    return loss, {"accuracy": correct, "logit_scale": scale}


# ---------------------------------------------------------------------------------------------------------
# the task


def default_config() -> ml_collections.ConfigDict:
    """The reference's sizes, L = 10 (the paper config uses L = 64)."""
    return ml_collections.ConfigDict(dict(
        legendre=10, hidden=128, layers=2, dim=16, w0_first=30.0, w0=1.0, dropout=0.5,
        views=("image", "map"), image_dim=32, map_dim=16, hex_radius=3, fusion_hidden=128))


class SpatialTask:
    """Training-core Task. Batch: 'lonlat' (B, 2) float (lon, lat) degrees, 'image' (B, H, W, C) and/or
    'map' (B, 2k+1, 2k+1, C) as model.views says, optional 'weights' (B,) (0 = padding row)."""

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        self.cfg = default_config() if cfg is None else cfg
        self.model = SpatialModel(self.cfg)

    def init(self, rng, batch):
        p_rng, d_rng = jax.random.split(rng)
        return self.model.init({"params": p_rng, "dropout": d_rng}, batch, train=False)

    def loss(self, params, batch, rng):
        loc, fused, log_scale = self.model.apply(params, batch, train=True, rngs={"dropout": rng})
        return info_nce(fused, loc, log_scale, batch.get("weights"))

    def eval_step(self, params, batch, rng):
        """Loss and accuracy without dropout, weighted by the batch's real rows."""
        loc, fused, log_scale = self.model.apply(params, batch, train=False)
        loss, m = info_nce(fused, loc, log_scale, batch.get("weights"))
        w = jnp.sum(batch["weights"]).astype(jnp.float32) if "weights" in batch else jnp.float32(loc.shape[0])
        return {"loss": (loss * w, w), "accuracy": (m["accuracy"] * w, w)}

    @staticmethod
    def decay(path) -> bool:
        """Whether AdamW's weight decay applies to the parameter at `path` (a tuple of keys): kernels yes;
        biases, norm scales and the temperature no."""
        return path[-1] == "kernel"

    def decay_mask(self, params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: self.decay(tuple(str(getattr(k, "key", k)) for k in p)), params)

    def embed(self, params, lonlat, batch_size: int = 4096) -> np.ndarray:
        """Location embeddings (N, d) of (N, 2) (lon, lat) degrees: the part kept after pretraining."""
        a = check_lonlat(lonlat).astype(np.float32)
        if getattr(self, "_locate", None) is None:
            self._locate = jax.jit(lambda p, x: self.model.apply(p, x, method=SpatialModel.locate))
        out = [np.asarray(self._locate(params, a[i:i + batch_size])) for i in range(0, len(a), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.cfg.dim), np.float32)

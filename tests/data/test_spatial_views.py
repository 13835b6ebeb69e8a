import math

import numpy as np
import pytest

from jaxemb.data import spatial as D
from jaxemb.models.spatial import hex_disk_mask


def _brute_hex_bin(centers, points, k, spacing):
    """Each point goes to the nearest cell centre (hexagons are the Voronoi cells of their centres),
    searched over a disk two rings wider than k; kept when that cell is inside the radius-k disk."""
    K = k + 2
    cdx, cdy = D.hex_cell_offsets(K, spacing)
    inside = hex_disk_mask(K)
    rr, qq = np.mgrid[-K:K + 1, -K:K + 1]
    out = np.zeros((len(centers), 2 * k + 1, 2 * k + 1))
    for i, c in enumerate(centers):
        for p in points:
            dx = ((p[0] - c[0] + 180) % 360 - 180) * math.cos(math.radians(c[1]))
            d = np.where(inside, (cdx - dx) ** 2 + (cdy - (p[1] - c[1])) ** 2, np.inf)
            r, q = np.unravel_index(np.argmin(d), d.shape)
            r, q = rr[r, q], qq[r, q]
            if max(abs(q), abs(r), abs(q + r)) <= k:
                out[i, r + k, q + k] += 1
    return out


def test_hex_bin_matches_nearest_cell_centre_brute_force():
    rng = np.random.default_rng(0)
    centers = np.c_[rng.uniform(-20, 20, 6), rng.uniform(-60, 60, 6)]
    centers = np.r_[centers, [[179.95, 10.0]]]  # a disk across the antimeridian
    points = np.concatenate([c + rng.uniform(-0.6, 0.6, (150, 2)) / [math.cos(math.radians(c[1])), 1]
                             for c in centers])
    points[:, 0] = (points[:, 0] + 180) % 360 - 180
    got = D.hex_bin(centers, points, k=3, spacing=0.1)[..., 0]
    np.testing.assert_array_equal(got, _brute_hex_bin(centers, points, 3, 0.1))
    assert got.sum() > 100 and not got[:, ~hex_disk_mask(3)].any()


def test_cell_centres_fall_in_their_own_cells():
    c = np.array([[10.0, 45.0]])
    dx, dy = D.hex_cell_offsets(3, 0.1)
    m = hex_disk_mask(3)
    pts = D._offsets_to_lonlat(c[0], dx[m], dy[m])
    got = D.hex_bin(c, pts, k=3, spacing=0.1)[0, ..., 0]
    np.testing.assert_array_equal(got, m.astype(float))


def test_land_and_ocean_at_known_places():
    ll = [[0.0, 0.0], [-150.0, 0.0], [-30.0, 40.0], [2.35, 48.85], [-100.0, 40.0], [135.0, -25.0]]
    np.testing.assert_array_equal(D.is_land(ll), [False, False, False, True, True, True])
    tiles = D.image_view([[-100.0, 40.0], [-150.0, 0.0]], size=8)
    assert tiles.shape == (2, 8, 8, 1) and tiles[0].min() == 1 and tiles[1].max() == 0
    rgb = D.image_view([[20.0, 24.0], [-150.0, 0.0]], size=4, layers=("rgb", "land"))  # Sahara, Pacific
    assert rgb.shape == (2, 4, 4, 4) and 0 <= rgb.min() and rgb.max() <= 1
    sahara, pacific = rgb[0].mean((0, 1)), rgb[1].mean((0, 1))
    assert sahara[0] > sahara[2] and pacific[2] > pacific[0] and sahara[3] == 1 and pacific[3] == 0
    land = D.land_fraction_cells([[-100.0, 40.0], [-150.0, 0.0]])
    np.testing.assert_array_equal(land[0], hex_disk_mask(3).astype(float))
    assert land[1].max() == 0


def test_map_view_sees_a_known_city_population():
    ll, pop, names = D.places(15000)
    paris = names.index("Paris")
    assert pop[paris] > 2e6 and abs(ll[paris, 0] - 2.35) < 0.1 and abs(ll[paris, 1] - 48.86) < 0.1
    view = D.map_view(ll[paris:paris + 1])
    assert view.shape == (1, 7, 7, 4)
    assert view[0, 3, 3, 1] >= math.log1p(pop[paris]) and view[0, 3, 3, 0] >= math.log(2)
    assert view[..., 2].sum() > 0  # airfields near Paris
    assert len(D.airfields()) > 20000


def test_raster_tile_is_north_up_and_wraps_the_antimeridian():
    rows, cols = np.mgrid[0:180, 0:360]
    raster = np.stack([rows, cols], -1)  # one-degree pixels: row 0 is 90..89 N, column 0 is 180..179 W
    t = D.raster_tile(raster, [[179.5, 0.0]], size=2, deg_per_px=1.0)[0]
    np.testing.assert_array_equal(t[:, :, 0], [[89, 89], [90, 90]])  # north row first
    np.testing.assert_array_equal(t[:, :, 1], [[359, 0], [359, 0]])  # east of 180 wraps to column 0


def test_user_tiles_and_count_tables(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 4, 2)))
    np.save(tmp_path / "b.npy", np.zeros((4, 4, 2)))
    assert D.load_tiles(str(tmp_path), ["a", "b"]).shape == (2, 4, 4, 2)
    with pytest.raises(FileNotFoundError, match="location id 'c'"):
        D.load_tiles(str(tmp_path), ["c"])
    p = tmp_path / "osm.csv"
    p.write_text("id,q,r,shops,roads\na,0,0,3,1\na,1,-1,2,0\nb,-3,3,1,5\n")
    t = D.load_counts(str(p), ["a", "b"])
    assert t.shape == (2, 7, 7, 2)
    np.testing.assert_array_equal(t[0, 3, 3], [3, 1])
    np.testing.assert_array_equal(t[0, 2, 4], [2, 0])
    np.testing.assert_array_equal(t[1, 6, 0], [1, 5])
    p.write_text("id,q,r,shops\na,4,0,1\n")
    with pytest.raises(ValueError, match="outside the hex disk"):
        D.load_counts(str(p), ["a"])
    p.write_text("id,q,shops\na,0,1\n")
    with pytest.raises(ValueError, match=r"lacks columns \['r'\]"):
        D.load_counts(str(p), ["a"])
    p.write_text("id,q,r,shops\na,0,0,many\n")
    with pytest.raises(ValueError, match="line 2: non-numeric"):
        D.load_counts(str(p), ["a"])


def test_bad_input_names_the_argument_and_the_extra():
    with pytest.raises(ValueError, match="centers .*look swapped"):
        D.hex_bin([[48.85, 2.35], [40.0, -100.0]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="points has 1 rows with NaN"):
        D.hex_bin([[0.0, 0.0]], [[np.nan, 0.0]])
    with pytest.raises(ImportError, match=r"'no-such-package'.*jaxemb\[spatial\]"):
        D.require("no_such_module_for_jaxemb", "no-such-package")
    with pytest.raises(ValueError, match="basemap raster 'sat'"):
        D.image_view([[0.0, 0.0]], layers=("sat",))
    with pytest.raises(ValueError, match="min_population=123"):
        D.places(123)


def test_elevation_at_known_places_oceans_at_sea_level_and_the_image_channel():
    """pvlib's raster, rows north to south and columns west to east, read as (lon, lat): the oceans are 0,
    the coast near sea level, Denver about 1600 m, the high Sierra Nevada and Tibet far higher."""
    places = {"pacific": (-140.0, 30.0), "atlantic": (-30.0, 30.0), "san_francisco": (-122.42, 37.77),
              "denver": (-104.99, 39.74), "sierra_nevada": (-118.29, 36.58), "tibet": (90.0, 32.0),
              "dead_sea": (35.5, 31.5)}
    e = dict(zip(places, D.elevation(list(places.values()))))
    assert e["pacific"] == e["atlantic"] == 0
    assert abs(e["san_francisco"]) < 100 and 1400 < e["denver"] < 1800
    assert e["sierra_nevada"] > 2500 and e["tibet"] > 4000 and e["dead_sea"] < -100
    raster = D.elevation_raster()
    assert raster.shape == (2160, 4320) and raster.dtype == np.float32 and np.isfinite(raster).all()
    assert -500 < raster.min() < 0 and 6000 < raster.max() < 7000
    tiles = D.image_view([[-104.99, 39.74], [-140.0, 30.0]], size=4, deg_per_px=0.05,
                         layers=("elevation", "elevation"))
    assert tiles.shape == (2, 4, 4, 2) and tiles.dtype == np.float32
    np.testing.assert_allclose(tiles[0, ..., 1].mean(), e["denver"] / D.ELEVATION_SCALE, rtol=0.15)
    assert (tiles[1] == 0).all()

"""hats_margin.healpix calls cdshealpix's compiled core without astropy: its results must be
cdshealpix.nested's, bit for bit, and a build must not load astropy."""

import subprocess
import sys

import astropy.units as u
import cdshealpix.nested as cds
import numpy as np
import pytest
from astropy.coordinates import Latitude, Longitude
from hypothesis import given, settings
from hypothesis import strategies as st

from hats_margin import healpix

# longitudes at and around every wrap point, poles, base-pixel corners, huge values
EDGE_LON = np.array([
    0.0, -0.0, 360.0, -360.0, 720.0, -720.0, 1e-300, -1e-300, -1e-20, 1e-20, 359.99999999999994,
    360.00000000000006, -359.99999999999994, 180.0, 45.0, 90.0, 135.0, 225.0, 270.0, 315.0, 1e10, -1e10,
    1e300, -1e300, np.nextafter(360.0, 0), np.nextafter(0.0, -1),
])
EDGE_LAT = np.array([90.0, -90.0, 0.0, 41.810314895778596, -41.810314895778596, np.nextafter(90.0, 0),
                     -np.nextafter(90.0, 0), 1e-300, -1e-300, 45.0, -45.0, 66.0, -66.0])


def _edge_points():
    lon, lat = np.meshgrid(EDGE_LON, EDGE_LAT)
    return lon.ravel(), lat.ravel()


@pytest.mark.parametrize("depth", [0, 1, 3, 7, 13, 20, 29])
def test_lonlat_to_healpix_is_cdshealpix_bit_for_bit(depth):
    rng = np.random.default_rng(depth)
    lon = np.concatenate([_edge_points()[0], rng.uniform(-1000, 1000, 20_000)])
    lat = np.concatenate([_edge_points()[1], rng.uniform(-90, 90, 20_000)])
    ours = healpix.lonlat_to_healpix(lon, lat, depth)
    theirs = cds.lonlat_to_healpix(Longitude(lon, u.deg), Latitude(lat, u.deg), depth)
    assert ours.dtype == theirs.dtype == np.uint64
    np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30),
    st.floats(-90, 90, allow_nan=False),
    st.integers(0, 29),
)
def test_lonlat_to_healpix_matches_on_any_finite_longitude(lons, lat, depth):
    lon = np.array(lons)
    lats = np.full(lon.shape, lat)
    np.testing.assert_array_equal(
        healpix.lonlat_to_healpix(lon, lats, depth),
        cds.lonlat_to_healpix(Longitude(lon, u.deg), Latitude(lats, u.deg), depth),
    )


def test_wrap_longitude_is_astropys():
    rng = np.random.default_rng(3)
    lon = np.concatenate([EDGE_LON, rng.uniform(-1e4, 1e4, 10_000), rng.normal(0, 1e-12, 1000)])
    np.testing.assert_array_equal(healpix.wrap_longitude(lon), Longitude(lon, u.deg).deg)
    np.testing.assert_array_equal(
        healpix.wrap_longitude(np.radians(lon), 360.0 * (np.pi / 180.0)), Longitude(np.radians(lon), u.rad).rad
    )


def test_latitude_beyond_the_poles_is_refused():
    with pytest.raises(ValueError, match="Latitude"):
        healpix.lonlat_to_healpix(np.array([0.0]), np.array([90.000001]), 5)


@pytest.mark.parametrize("depth", [0, 2, 5, 13, 29])
def test_centres_vertices_and_neighbours_are_cdshealpix_bit_for_bit(depth):
    rng = np.random.default_rng(100 + depth)
    cells = np.unique(np.concatenate([
        rng.integers(0, 12 * 4**depth, 3000), np.arange(min(12 * 4**depth, 200)), [12 * 4**depth - 1],
    ])).astype(np.uint64)
    lon, lat = healpix.healpix_to_lonlat_deg(cells, depth)
    ref_lon, ref_lat = cds.healpix_to_lonlat(cells, depth)
    np.testing.assert_array_equal(lon, ref_lon.to_value("deg"))
    np.testing.assert_array_equal(lat, ref_lat.to_value("deg"))
    for step in (1, 4):
        v_lon, v_lat = healpix.vertices_rad(cells, depth, step)
        ref_v_lon, ref_v_lat = cds.vertices(cells, depth, step=step)
        np.testing.assert_array_equal(v_lon, ref_v_lon.to_value("rad"))
        np.testing.assert_array_equal(v_lat, ref_v_lat.to_value("rad"))
    np.testing.assert_array_equal(healpix.neighbours(cells, depth), cds.neighbours(cells, depth))


def test_bad_cells_and_depths_are_refused_like_cdshealpix():
    with pytest.raises(ValueError, match="out of"):
        healpix.neighbours(np.array([12 * 4**3]), 3)
    with pytest.raises(ValueError, match="Depth"):
        healpix.healpix_to_lonlat_deg(np.array([0]), 30)


def test_a_build_loads_neither_astropy_nor_cdshealpix_python_layer(tmp_path):
    """The demo build in a fresh interpreter: the core is used, astropy never imported."""
    code = (
        "import sys\n"
        "from hats_margin.cli import main\n"
        f"assert main(['demo', {str(tmp_path)!r}]) == 0\n"
        "print('astropy' in sys.modules, 'cdshealpix.nested' in sys.modules, 'cdshealpix.cdshealpix' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False True"


def test_cdshealpix_imported_after_the_core_reuses_it():
    code = (
        "import sys\n"
        "from hats_margin import healpix\n"
        "core = healpix._core()\n"
        "import cdshealpix.nested as cds\n"
        "import numpy as np\n"
        "print(sys.modules['cdshealpix.cdshealpix'] is core, int(cds.neighbours(np.array([5]), 3)[0][4]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "5"]

"""The four cdshealpix functions a build uses, called on cdshealpix's compiled core directly.

cdshealpix's Python layer (``cdshealpix.nested``) takes astropy ``Longitude``/``Latitude``
values, so importing it loads astropy: about 0.6 s of every command's start-up and of every
worker process's, for nothing a build needs. Here the compiled module
(``cdshealpix/cdshealpix*.so``) is loaded on its own and given what the Python layer would
give it: radians, ``lon`` wrapped into [0, 360) degrees exactly as astropy's ``Longitude``
wraps it, ``uint8`` depths, and preallocated outputs. The results are the same arrays, bit for
bit (``tests/test_healpix.py`` compares them with ``cdshealpix.nested`` on adversarial points).

The core is registered as ``cdshealpix.cdshealpix`` in ``sys.modules``, so a later ``import
cdshealpix`` (hats, the verifier, the sky map) reuses it: a compiled PyO3 module may be
initialised once per process. If the core cannot be found or loaded that way (another
cdshealpix layout), these functions fall back to ``cdshealpix.nested`` itself.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from functools import cache
from pathlib import Path

import numpy as np

_CORE = "cdshealpix.cdshealpix"


@cache
def _core():
    """cdshealpix's compiled module, loaded without its package (None: not loadable so)."""
    if _CORE in sys.modules:
        return sys.modules[_CORE]
    try:
        package = importlib.util.find_spec("cdshealpix")  # finds, does not run, the package
        if package is None or not package.submodule_search_locations:
            return None
        for directory in package.submodule_search_locations:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = Path(directory) / f"cdshealpix{suffix}"
                if path.is_file():
                    spec = importlib.util.spec_from_file_location(_CORE, path)
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                    sys.modules[_CORE] = module
                    return module
    except (ImportError, OSError, AttributeError):
        return None
    return None


@cache
def _nested():
    """cdshealpix's Python layer (loads astropy): the fallback."""
    import cdshealpix.nested

    return cdshealpix.nested


def _check_depth(depth: int) -> np.ndarray:
    """The depth as cdshealpix wants it; ValueError outside [0, 29]."""
    if not 0 <= int(depth) <= 29:
        raise ValueError("Depth must be in the [0, 29] closed range")
    return np.uint8(depth)


def _check_cells(cells, depth: int) -> np.ndarray:
    """Cells as contiguous uint64; ValueError for a cell outside the depth's range."""
    cells = np.atleast_1d(np.asarray(cells))
    if cells.size and ((cells < 0).any() or (cells >= 12 * 4 ** int(depth)).any()):
        raise ValueError(f"The input HEALPix cells contains value out of [0, {12 * 4 ** int(depth) - 1}]")
    return np.ascontiguousarray(cells, dtype=np.uint64)


def wrap_longitude(lon, full_turn: float = 360.0) -> np.ndarray:
    """Longitudes in [0, full_turn), wrapped as astropy's ``Longitude`` wraps them (finite
    values; the same float operations, so the same results to the last bit). ``full_turn`` is
    360 for degrees, ``360 * (pi / 180)`` for radians (astropy's own conversion of 360 deg)."""
    lon = np.array(lon, dtype=np.float64)  # a copy
    with np.errstate(invalid="ignore"):
        wraps = lon // full_turn
    valid = np.isfinite(wraps) & (wraps != 0)
    if np.any(valid):
        lon -= wraps * full_turn
        lon[lon >= full_turn] -= full_turn
        lon[lon < 0.0] += full_turn
    return lon


_FULL_TURN_RAD = 360.0 * (np.pi / 180.0)

PARALLEL_MIN_CELLS = 100_000
"""Fewer cells than this are computed on one thread: the core starts a pool of threads per call,
which on a few hundred cells costs more CPU than the work (200 vs 124 us for 50 points)."""


def _threads(size: int) -> np.uint16:
    """The core's ``num_threads`` for ``size`` cells: 1 below ``PARALLEL_MIN_CELLS``, else 0 (every core)."""
    return np.uint16(1 if size < PARALLEL_MIN_CELLS else 0)


def lonlat_to_healpix(lon_deg, lat_deg, depth: int) -> np.ndarray:
    """``cdshealpix.nested.lonlat_to_healpix(Longitude(lon, deg), Latitude(lat, deg), depth)``:
    the nested cell (uint64) at ``depth`` of each finite point; ValueError for |lat| > 90."""
    lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
    if np.any(np.abs(lat) > 90.0):
        raise ValueError("Latitude angle(s) must be within -90 deg <= angle <= 90 deg")
    core = _core()
    if core is None:
        import astropy.units as u
        from astropy.coordinates import Latitude, Longitude

        return _nested().lonlat_to_healpix(Longitude(lon_deg, u.deg), Latitude(lat_deg, u.deg), depth)
    lon = np.atleast_1d(np.radians(wrap_longitude(lon_deg)))
    lat = np.radians(lat)
    lon, lat = np.broadcast_arrays(lon, lat)
    ipix = np.empty(lon.shape, dtype=np.uint64)
    dx = np.empty(lon.shape, dtype=np.float64)
    dy = np.empty(lon.shape, dtype=np.float64)
    depths = np.broadcast_to(_check_depth(depth), lon.shape)
    core.lonlat_to_healpix(depths, lon, lat, ipix, dx, dy, _threads(lon.size))
    return ipix


def healpix_to_lonlat_deg(cells, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (lon, lat in degrees) of nested cells, as ``healpix_to_lonlat(...).deg``."""
    core = _core()
    if core is None:
        lon, lat = _nested().healpix_to_lonlat(cells, int(depth))
        return lon.to_value("deg"), lat.to_value("deg")
    cells = _check_cells(cells, depth)
    lon = np.empty(cells.shape)
    lat = np.empty(cells.shape)
    depths = np.broadcast_to(_check_depth(depth), cells.shape)
    core.healpix_to_lonlat(depths, cells, 0.5, 0.5, lon, lat, _threads(cells.size))
    return np.degrees(wrap_longitude(lon, _FULL_TURN_RAD)), np.degrees(lat)


def vertices_rad(cells, depth: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``4 * step`` boundary points (lon, lat in radians) of each cell, as ``vertices(...).rad``."""
    core = _core()
    if core is None:
        lon, lat = _nested().vertices(cells, int(depth), step=step)
        return lon.to_value("rad"), lat.to_value("rad")
    if step < 1:
        raise ValueError("The number of step must be >= 1")
    cells = _check_cells(cells, depth)
    lon = np.zeros((*cells.shape, 4 * step))
    lat = np.zeros((*cells.shape, 4 * step))
    depths = np.full(cells.shape, _check_depth(depth), dtype=np.uint8)
    core.vertices(depths, cells, step, lon, lat, _threads(cells.size))
    return wrap_longitude(lon, _FULL_TURN_RAD), lat


def neighbours(cells, depth: int) -> np.ndarray:
    """The 9 cells around each cell (itself in the middle; -1 where there is none), int64."""
    core = _core()
    if core is None:
        return _nested().neighbours(cells, depth)
    cells = _check_cells(cells, depth)
    out = np.zeros((*cells.shape, 9), dtype=np.int64)
    core.neighbours(int(_check_depth(depth)), cells, out, _threads(cells.size))
    return out

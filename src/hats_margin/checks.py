"""Input checks on rows already in memory: do their ra/dec agree with their spatial index?

Pure numpy + cdshealpix, no I/O. The map stage calls :func:`check_coordinates` on the rows it
has read anyway (the candidate rows; every row with ``check_input=True``).

A row contradicts its spatial index when its (ra, dec) lies farther than
``TOLERANCE_ARCSEC`` from the HEALPix cell its index names (at the index's order). The
tolerance absorbs rounding (float32 coordinates, another HEALPix library computing the
index); a contradiction that large changes which rows a margin holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hats_margin import healpix
from hats_margin.pixel_distance import cell_caps

TOLERANCE_ARCSEC = 0.1


@dataclass(frozen=True)
class CoordinateCheck:
    """Outcome for the checked rows (positions are indices into the arrays given)."""

    contradicting: np.ndarray
    """rows whose finite ra/dec lie outside the cell of their spatial index (or dec outside +-90)"""
    non_finite: np.ndarray
    """rows whose ra or dec is NaN, infinite or null: they have no position"""


def check_coordinates(ra_deg, dec_deg, spatial_index, index_order: int) -> CoordinateCheck:
    """Compare each row's (ra, dec) with the cell its spatial index names."""
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    spatial_index = np.asarray(spatial_index, dtype=np.int64)
    finite = np.isfinite(ra) & np.isfinite(dec)
    non_finite = np.flatnonzero(~finite)
    in_range = finite & (np.abs(dec) <= 90.0)
    bad = [np.flatnonzero(finite & ~in_range)]
    rows = np.flatnonzero(in_range)
    if len(rows):
        pixels = healpix.lonlat_to_healpix(np.mod(ra[rows], 360.0), dec[rows], index_order).astype(np.int64)
        differ = rows[pixels != spatial_index[rows]]
        if len(differ):  # near a cell's edge rounding may pick the neighbour: measure the distance
            bad.append(differ[_farther_than_cell(ra[differ], dec[differ], spatial_index[differ], index_order)])
    return CoordinateCheck(np.sort(np.concatenate(bad)), non_finite)


def _farther_than_cell(ra, dec, cells, order) -> np.ndarray:
    """Points farther than the tolerance from the cell (a bound: centre distance > radius + tol)."""
    unique, inverse = np.unique(cells, return_inverse=True)
    c_ra, c_dec, radius = cell_caps(unique, order)  # certified: every point of the cell is within radius
    distance = _angular_distance_arcsec(ra, dec, c_ra[inverse], c_dec[inverse])
    return distance > radius[inverse] + TOLERANCE_ARCSEC


def _angular_distance_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance in arcsec between points given in degrees (atan2 form: exact near 0 and 180 deg)."""
    ra1, dec1, ra2, dec2 = (np.radians(x) for x in (ra1, dec1, ra2, dec2))
    sin_dra, cos_dra = np.sin(ra2 - ra1), np.cos(ra2 - ra1)
    num = np.hypot(np.cos(dec2) * sin_dra, np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * cos_dra)
    den = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * cos_dra
    return np.degrees(np.arctan2(num, den)) * 3600.0

"""Synthetic HATS catalogs for tests and benchmarks.

Three helpers, all pure numpy/pyarrow/hats (no dask, no pandas in the hot path):

* :func:`write_hats_catalog` partitions an arrow table adaptively on the HEALPix tree and
  writes it as a strictly valid HATS catalog (the layout hats-import produces).
* :func:`realistic_sky` draws a deterministic, sky-like table: a uniform background, a dense
  galactic-plane band, gaussian clusters, and explicit points at the awkward places of the
  HEALPix grid (poles, RA 0/360, the 8 points where three base pixels meet).
* :func:`points_table` wraps given coordinates (and extra columns) into a table.

Writing is vectorised: one stable argsort of all rows by ``_healpix_29``, the partition
tree is found with ``searchsorted`` on the sorted index, and every partition is then a
contiguous range of the sort order. Partitions are written by a small thread pool
(pyarrow releases the GIL while encoding and compressing).
"""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cdshealpix
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.coordinates import Latitude, Longitude
from hats.catalog import PartitionInfo, TableProperties
from hats.io.file_io import get_parquet_write_table_kwargs
from hats.pixel_math.healpix_pixel import HealpixPixel
from hats.pixel_math.healpix_pixel_function import sort_pixels

from hats_margin.geometry import MAX_ORDER, unit_vectors
from hats_margin.io import dir_number

__all__ = [
    "SPATIAL_INDEX_COLUMN",
    "SPATIAL_INDEX_ORDER",
    "THREE_PIXEL_VERTICES_DEG",
    "points_table",
    "realistic_sky",
    "spatial_index",
    "write_hats_catalog",
]

SPATIAL_INDEX_COLUMN = "_healpix_29"
SPATIAL_INDEX_ORDER = MAX_ORDER

_DEC_THREE_PIXEL_DEG = math.degrees(math.asin(2.0 / 3.0))  # 41.8103...
THREE_PIXEL_VERTICES_DEG = tuple(
    (ra, sign * _DEC_THREE_PIXEL_DEG) for sign in (1.0, -1.0) for ra in (0.0, 90.0, 180.0, 270.0)
)
"""(ra_deg, dec_deg) of the 8 points where exactly three order-0 HEALPix pixels meet."""

# ICRS -> galactic rotation (Hipparcos, as in astropy); its transpose maps galactic -> ICRS.
_ICRS_TO_GALACTIC = np.array(
    [
        [-0.0548755604162154, -0.8734370902348850, -0.4838350155487132],
        [0.4941094278755837, -0.4448296299600112, 0.7469822444972189],
        [-0.8676661490190047, -0.1980763734312015, 0.4559837761750669],
    ]
)


# --------------------------------------------------------------------------------------------
# Spatial index
# --------------------------------------------------------------------------------------------


def spatial_index(ra_deg, dec_deg) -> np.ndarray:
    """Nested order-29 HEALPix index of (ra, dec) in degrees, as int64.

    Same computation as ``hats.pixel_math.spatial_index.compute_spatial_index`` (astropy
    ``Longitude`` wraps RA into [0, 360), so RA 360 maps like RA 0), called directly.
    """
    ra_deg = np.asarray(ra_deg, dtype=np.float64)
    dec_deg = np.asarray(dec_deg, dtype=np.float64)
    if ra_deg.shape != dec_deg.shape:
        raise ValueError(f"ra and dec have different shapes: {ra_deg.shape} != {dec_deg.shape}")
    if ra_deg.size and not (np.isfinite(ra_deg).all() and np.isfinite(dec_deg).all()):
        raise ValueError("ra and dec must be finite (no NaN or inf)")
    lon = Longitude(ra_deg, unit="deg")
    lat = Latitude(dec_deg, unit="deg")
    return cdshealpix.lonlat_to_healpix(lon, lat, SPATIAL_INDEX_ORDER).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def _adaptive_partitions(
    sorted_index: np.ndarray, max_rows: int, lowest_order: int, highest_order: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split pixels top-down while they hold more than ``max_rows`` rows.

    ``sorted_index`` is the sorted ``_healpix_29`` of every row. Returns ``(orders, pixels,
    starts, stops)``: one entry per non-empty partition, ``sorted_index[starts:stops]`` being
    its rows. A pixel is kept whole iff it holds ``<= max_rows`` rows or is at ``highest_order``,
    the rule hats-import's bottom-up alignment applies (empty pixels dropped).
    """
    n_rows = len(sorted_index)
    found = []  # (order, pixels, starts, stops) per order
    if n_rows == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty

    shift = 2 * (SPATIAL_INDEX_ORDER - lowest_order)
    coarse = sorted_index >> shift
    starts = np.concatenate(([0], np.flatnonzero(np.diff(coarse)) + 1)).astype(np.int64)
    pixels = coarse[starts]
    stops = np.append(starts[1:], n_rows).astype(np.int64)
    del coarse

    order = lowest_order
    while len(pixels):
        counts = stops - starts
        keep = (counts <= max_rows) | (order >= highest_order)
        found.append((np.full(keep.sum(), order, dtype=np.int64), pixels[keep], starts[keep], stops[keep]))
        split = pixels[~keep]
        if len(split) == 0:
            break
        order += 1
        children = (split[:, None] * 4 + np.arange(4)[None, :]).ravel()
        shift = 2 * (SPATIAL_INDEX_ORDER - order)
        child_starts = np.searchsorted(sorted_index, children << shift, side="left")
        child_stops = np.searchsorted(sorted_index, (children + 1) << shift, side="left")
        nonempty = child_stops > child_starts
        pixels, starts, stops = children[nonempty], child_starts[nonempty], child_stops[nonempty]

    orders, pixels, starts, stops = (np.concatenate(parts) for parts in zip(*found))
    return orders, pixels, starts, stops


def _breadth_first(orders: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Permutation putting (orders, pixels) into hats' ``sort_pixels`` order."""
    healpix = [HealpixPixel(int(k), int(p)) for k, p in zip(orders, pixels)]
    rank = {pix: i for i, pix in enumerate(healpix)}
    return np.array([rank[pix] for pix in sort_pixels(healpix)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _relative_file(order: int, pixel: int, npix_suffix: str) -> str:
    """Path of a partition's parquet file, relative to ``dataset/``."""
    leaf = f"Norder={order}/Dir={dir_number(pixel)}/Npix={pixel}"
    if npix_suffix in ("/", "\\"):
        return f"{leaf}/part0.parquet"
    return f"{leaf}{npix_suffix}"


def _prepare_table(table: pa.Table, ra_column: str, dec_column: str) -> tuple[pa.Table, np.ndarray]:
    """Table with ``_healpix_29`` as its first column (replacing any existing one), and that index."""
    for name in (ra_column, dec_column):
        if name not in table.column_names:
            raise ValueError(f"column {name!r} not in table (columns: {table.column_names})")
        if table.column(name).null_count:
            raise ValueError(f"column {name!r} has nulls")
    if SPATIAL_INDEX_COLUMN in table.column_names:
        table = table.drop_columns([SPATIAL_INDEX_COLUMN])
    ra = table.column(ra_column).to_numpy()
    dec = table.column(dec_column).to_numpy()
    index = spatial_index(ra, dec)
    table = table.add_column(0, pa.field(SPATIAL_INDEX_COLUMN, pa.int64()), pa.array(index))
    return table.combine_chunks(), index


def write_hats_catalog(
    table: pa.Table,
    path: str | os.PathLike,
    *,
    catalog_name: str,
    ra_column: str = "ra",
    dec_column: str = "dec",
    max_rows_per_partition: int = 1_000_000,
    lowest_order: int = 0,
    highest_order: int = 10,
    row_group_size: int = 100_000,
    npix_suffix: str = ".parquet",
    catalog_type: str = "object",
    write_table_kwargs: dict | None = None,
    n_threads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Partition ``table`` on the HEALPix tree and write it as a HATS catalog at ``path``.

    Adds ``_healpix_29`` (int64, first column) computed from ``ra_column``/``dec_column`` in
    degrees (an existing ``_healpix_29`` column is recomputed). A pixel splits into its four
    children while it holds more than ``max_rows_per_partition`` rows, down to
    ``highest_order``; empty pixels get no partition. Each partition is sorted by
    ``_healpix_29`` (stable, so ties keep the input order) and written with hats' parquet
    settings (zstd, byte-stream-split floats, ``sorting_columns`` on ``_healpix_29``) in row
    groups of ``row_group_size`` rows.

    Output: ``dataset/Norder=K/Dir=D/Npix=N<npix_suffix>`` (``Npix=N/part0.parquet`` when
    ``npix_suffix="/"``), ``dataset/_common_metadata``, ``dataset/_metadata`` (breadth-first
    pixel order), ``partition_info.csv``, and last ``hats.properties``/``properties``.

    Parameters
    ----------
    write_table_kwargs : dict | None
        Overrides for ``hats.io.file_io.get_parquet_write_table_kwargs`` (e.g. ``{"compression":
        "snappy"}`` for faster generation).
    n_threads : int | None
        Partitions written concurrently (default: number of CPUs, at most 8).
    overwrite : bool
        Replace ``path`` if it exists and is not empty; otherwise that raises ``FileExistsError``.

    Returns
    -------
    Path
        The catalog directory.
    """
    path = Path(path)
    if max_rows_per_partition < 1:
        raise ValueError(f"max_rows_per_partition must be >= 1, got {max_rows_per_partition}")
    if not 0 <= lowest_order <= highest_order <= SPATIAL_INDEX_ORDER:
        raise ValueError(
            f"need 0 <= lowest_order <= highest_order <= {SPATIAL_INDEX_ORDER}, got {lowest_order}, {highest_order}"
        )
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    if not npix_suffix or (npix_suffix not in ("/", "\\") and ("/" in npix_suffix or "\\" in npix_suffix)):
        raise ValueError(f"npix_suffix must be '/' or a file suffix such as '.parquet', got {npix_suffix!r}")
    if table.num_rows == 0:
        raise ValueError("table has no rows: a HATS catalog needs at least one partition")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")

    table, index = _prepare_table(table, ra_column, dec_column)
    if path.exists():
        shutil.rmtree(path)
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    del index
    orders, pixels, starts, stops = _adaptive_partitions(
        sorted_index, max_rows_per_partition, lowest_order, highest_order
    )
    del sorted_index
    ranking = _breadth_first(orders, pixels)
    orders, pixels, starts, stops = orders[ranking], pixels[ranking], starts[ranking], stops[ranking]

    dataset_dir = path / "dataset"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    schema = table.schema
    kwargs = dict(write_table_kwargs or {})
    kwargs.setdefault("sorting_columns", [pq.SortingColumn(0)])
    kwargs = get_parquet_write_table_kwargs(schema, write_table_kwargs=kwargs)
    kwargs.pop("row_group_size", None)

    def write_one(i: int) -> pq.FileMetaData:
        """Write partition ``i`` (its rows in sort order) and return its parquet footer."""
        relative = _relative_file(int(orders[i]), int(pixels[i]), npix_suffix)
        target = dataset_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        part = table.take(pa.array(order[starts[i] : stops[i]]))
        collector: list[pq.FileMetaData] = []
        with pq.ParquetWriter(target, schema, metadata_collector=collector, **kwargs) as writer:
            writer.write_table(part, row_group_size=row_group_size)
        collector[0].set_file_path(relative)
        return collector[0]

    n_threads = n_threads or min(os.cpu_count() or 1, 8)
    if n_threads > 1 and len(pixels) > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            file_metadata = list(pool.map(write_one, range(len(pixels))))
    else:
        file_metadata = [write_one(i) for i in range(len(pixels))]

    pq.write_metadata(schema, dataset_dir / "_common_metadata")
    pq.write_metadata(schema, dataset_dir / "_metadata", metadata_collector=file_metadata)

    healpix = [HealpixPixel(int(k), int(p)) for k, p in zip(orders, pixels)]
    partition_info = PartitionInfo.from_healpix(healpix)
    partition_info.write_to_file(catalog_path=path)

    info = {
        "catalog_name": catalog_name,
        "catalog_type": catalog_type,
        "total_rows": int(table.num_rows),
        "ra_column": ra_column,
        "dec_column": dec_column,
        "healpix_column": SPATIAL_INDEX_COLUMN,
        "healpix_order": SPATIAL_INDEX_ORDER,
        "npix_suffix": npix_suffix,
        "hats_max_rows": int(max_rows_per_partition),
        "hats_order": int(orders.max()) if len(orders) else int(lowest_order),
        "moc_sky_fraction": f"{partition_info.calculate_fractional_coverage():0.5f}",
    }
    properties = TableProperties(
        **TableProperties.new_provenance_dict(path, builder="hats-margin synthetic", **info)
    )
    properties.to_properties_file(path)
    return path


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def points_table(ra_deg, dec_deg, **extra_columns) -> pa.Table:
    """A table with ``id`` (int64, 0..n-1 unless given), ``ra``, ``dec`` (float64 degrees) and
    any extra columns (arrays, lists or pyarrow arrays of the same length)."""
    ra = np.atleast_1d(np.asarray(ra_deg, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec_deg, dtype=np.float64))
    if ra.shape != dec.shape or ra.ndim != 1:
        raise ValueError(f"ra and dec must be 1-d and of the same length, got {ra.shape} and {dec.shape}")
    columns = {"id": extra_columns.pop("id", np.arange(len(ra), dtype=np.int64)), "ra": ra, "dec": dec}
    columns.update(extra_columns)
    arrays = {}
    for name, values in columns.items():
        array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        if len(array) != len(ra):
            raise ValueError(f"column {name!r} has {len(array)} values, expected {len(ra)}")
        arrays[name] = array
    return pa.table(arrays)


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) of ra/dec in degrees."""
    return np.stack(unit_vectors(ra_deg, dec_deg), axis=-1)


def _to_radec(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ra in [0, 360) and dec in degrees of vectors (normalised first)."""
    vectors = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    ra = np.degrees(np.arctan2(vectors[:, 1], vectors[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(vectors[:, 2], -1.0, 1.0)))
    return ra, dec


def _uniform_sphere(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform on the sphere (ra, dec in degrees)."""
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def _galactic_band(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A galactic-plane-like band: |b| < 10 deg, denser towards b=0 and towards the bulge."""
    bulge = rng.random(n) < 0.4
    gal_l = np.where(bulge, rng.normal(0.0, 25.0, n), rng.uniform(0.0, 360.0, n)) % 360.0
    gal_b = rng.normal(0.0, 3.0, n)
    outside = np.abs(gal_b) >= 10.0
    gal_b[outside] = rng.uniform(-10.0, 10.0, outside.sum())
    return _to_radec(_unit_vectors(gal_l, gal_b) @ _ICRS_TO_GALACTIC)


def _gaussian_cluster(
    rng: np.random.Generator, n: int, ra0_deg: float, dec0_deg: float, sigma_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blob around (ra0, dec0) on the tangent plane (fine at the poles and RA 0)."""
    centre = _unit_vectors(np.array([ra0_deg]), np.array([dec0_deg]))[0]
    helper = np.array([1.0, 0.0, 0.0]) if abs(centre[2]) > 0.9 else np.array([0.0, 0.0, 1.0])
    east = np.cross(helper, centre)
    east /= np.linalg.norm(east)
    north = np.cross(centre, east)
    offsets = rng.normal(0.0, math.radians(sigma_deg), (n, 2))
    return _to_radec(centre + offsets[:, :1] * east + offsets[:, 1:] * north)


# (ra, dec, sigma, weight): a pole cluster, one straddling RA 0, one on a three-pixel vertex.
_CLUSTERS = (
    (10.0, 89.5, 0.8, 2.0),
    (0.0, -30.0, 1.5, 2.0),
    (90.0, _DEC_THREE_PIXEL_DEG, 0.5, 1.0),
    (56.75, 24.12, 1.0, 1.5),  # Pleiades
    (201.0, -47.5, 0.3, 1.0),  # omega Cen-like, compact
    (10.68, 41.27, 1.2, 1.5),  # M31
    (80.9, -69.75, 3.0, 3.0),  # LMC
    (13.2, -72.8, 1.5, 1.5),  # SMC
    (270.0, -89.0, 0.4, 1.0),  # near the south pole
)


def _special_points() -> tuple[np.ndarray, np.ndarray]:
    """Points at the awkward places of the grid: poles, RA 0/360, three-pixel vertices."""
    eps = 1e-9  # degrees, ~4 micro-arcsec: well inside neighbouring order-29 pixels
    near = 1e-4  # degrees, ~0.36 arcsec
    points = []
    for dec in (90.0, -90.0):
        sign = 1.0 if dec > 0 else -1.0
        points += [(0.0, dec), (123.4, dec)]
        points += [(ra, dec - sign * near) for ra in (0.0, 45.0, 90.0, 180.0, 270.0, 359.9)]
        points += [(ra, dec - sign * 0.01) for ra in (10.0, 100.0, 190.0, 280.0)]
    for dec in (0.0, 12.5, -45.0, 60.0, -75.0):
        points += [(0.0, dec), (360.0, dec), (eps, dec), (360.0 - eps, dec), (near, dec), (360.0 - near, dec)]
    for ra, dec in THREE_PIXEL_VERTICES_DEG:
        points.append((ra, dec))
        for dra, ddec in ((near, 0.0), (-near, 0.0), (0.0, near), (0.0, -near), (eps, eps), (-eps, -eps)):
            points.append(((ra + dra) % 360.0, dec + ddec))
    ra, dec = np.array(points, dtype=np.float64).T
    return ra, dec


def _names(ids: np.ndarray, prefix: bytes = b"SRC") -> pa.Array:
    """``SRC0000000042``-style names, built as one byte buffer (fast for 10^7 rows)."""
    digits = 10
    width = len(prefix) + digits
    chars = np.empty((len(ids), width), dtype=np.uint8)
    chars[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    remaining = np.asarray(ids, dtype=np.int64) % 10**digits
    for position in range(width - 1, len(prefix) - 1, -1):
        chars[:, position] = 48 + remaining % 10
        remaining //= 10
    offsets = np.arange(0, (len(ids) + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(len(ids), pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def realistic_sky(n_rows: int, seed: int = 0) -> pa.Table:
    """A deterministic, sky-like table of ``n_rows`` rows.

    Positions: the explicit special points first (both poles and around them, exactly at and
    near RA 0 and RA 360, the 8 three-base-pixel vertices and around them; all of them if
    ``n_rows`` allows, else the first ``n_rows``), then ~55% uniform background, ~30% a
    galactic-plane band (|b| < 10 deg), ~15% gaussian clusters (one at the north pole, one
    straddling RA 0, one on a three-pixel vertex, ...). RA values lie in [0, 360] (360.0
    itself appears on purpose), Dec in [-90, 90].

    Columns: ``id`` int64 (0..n-1), ``ra``, ``dec`` float64, ``mag_g``, ``mag_r`` float32,
    ``mag_g_err`` float32, ``parallax`` float64 (~20% null), ``pm_ra`` float64, ``flags`` int32,
    ``n_obs`` int16, ``is_variable`` bool, ``name`` string, ``obs_time`` timestamp[ms, UTC].
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    rng = np.random.default_rng(seed)
    special_ra, special_dec = _special_points()
    n_special = min(n_rows, len(special_ra))
    remaining = n_rows - n_special
    n_band = int(remaining * 0.30)
    n_clusters = int(remaining * 0.15)
    n_uniform = remaining - n_band - n_clusters

    ra_parts = [special_ra[:n_special]]
    dec_parts = [special_dec[:n_special]]
    ra, dec = _uniform_sphere(rng, n_uniform)
    ra_parts.append(ra)
    dec_parts.append(dec)
    ra, dec = _galactic_band(rng, n_band)
    ra_parts.append(ra)
    dec_parts.append(dec)
    weights = np.array([c[3] for c in _CLUSTERS])
    sizes = rng.multinomial(n_clusters, weights / weights.sum())
    for (ra0, dec0, sigma, _), size in zip(_CLUSTERS, sizes):
        ra, dec = _gaussian_cluster(rng, int(size), ra0, dec0, sigma)
        ra_parts.append(ra)
        dec_parts.append(dec)
    ra = np.concatenate(ra_parts)
    dec = np.concatenate(dec_parts)

    ids = np.arange(n_rows, dtype=np.int64)
    mag_r = (rng.gamma(6.0, 1.0, n_rows) + 13.0).astype(np.float32)
    colour = rng.normal(0.6, 0.3, n_rows).astype(np.float32)
    mag_g = mag_r + colour
    mag_g_err = (0.001 * np.exp((mag_g - 14.0) / 2.5)).astype(np.float32)
    parallax = rng.exponential(0.5, n_rows)
    parallax_valid = rng.random(n_rows) >= 0.2
    pm_ra = rng.standard_t(3, n_rows) * 5.0
    flags = rng.integers(0, 2**10, n_rows, dtype=np.int32) * (rng.random(n_rows) < 0.1)
    n_obs = rng.poisson(40.0, n_rows).astype(np.int16)
    is_variable = rng.random(n_rows) < 0.05
    epoch_ms = np.int64(1_420_070_400_000)  # 2015-01-01T00:00Z
    obs_time = epoch_ms + rng.integers(0, 10 * 365 * 86_400_000, n_rows, dtype=np.int64)

    return pa.table(
        {
            "id": pa.array(ids),
            "ra": pa.array(ra),
            "dec": pa.array(dec),
            "mag_g": pa.array(mag_g),
            "mag_r": pa.array(mag_r),
            "mag_g_err": pa.array(mag_g_err),
            "parallax": pa.array(parallax, mask=~parallax_valid),
            "pm_ra": pa.array(pm_ra),
            "flags": pa.array(flags.astype(np.int32)),
            "n_obs": pa.array(n_obs),
            "is_variable": pa.array(is_variable),
            "name": _names(ids),
            "obs_time": pa.array(obs_time, type=pa.timestamp("ms", tz="UTC")),
        }
    )

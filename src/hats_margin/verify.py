"""Check a margin cache against its primary catalog, row by row, independently of the pipeline.

The contract
------------
For a destination pixel ``P`` (a partition of the primary or a pixel of its negative tree),
``margin(P)`` is the set of rows ``r`` of the primary such that ``r`` is not in ``P`` (by its
spatial index) and the great-circle distance from ``(ra, dec)`` of ``r`` to the closed region
of ``P`` is ``<= threshold``. Every margin row must be an exact copy of a primary row (all
columns, the primary's ``_common_metadata`` schema).

What is compared
----------------
* **missing**: rows the contract puts in ``margin(P)`` that the file of ``P`` lacks.
* **extra**: exact copies of primary rows that the contract does not put in ``margin(P)``, with
  their distance to ``P`` in units of the threshold (a coarse margin has many, up to ~3x).
  Rows that lie inside ``P`` itself (distance 0) are also a structural problem.
* **altered**: margin rows that equal no primary row (a value, a type or a column differs). A
  missing row whose ``(P, spatial index)`` matches an altered row is counted once, as altered.
* **duplicates**: more copies of a row in one pixel than the primary holds.
* **borderline**: rows whose distance is within ``rtol`` of the threshold on the other side
  (the verifier and the builder may round differently there); shown, never a failure.
* **structural**: pixels that are neither partitions nor negative-tree pixels, schemas that
  differ from the primary's (names and types), ``hats_nrows`` vs the rows in the files,
  ``partition_info.csv`` and ``_metadata`` vs the files, wrong ``Dir=``, ra/dec/healpix
  column properties that differ from the primary's.

``VerifyReport.ok`` is False on any missing, altered, duplicated row or structural problem.
Extra rows fail only an *exact* margin: one whose ``hats_margin_fine_filtering`` property is
``true`` (hats-margin's default). A margin without that property (hats-import) or with
``false`` is *coarse*: a superset by design, so extras are reported but allowed. Pass
``exact=True``/``False`` to override.

Independence from the pipeline
------------------------------
Nothing from the pipeline's candidate search is used (no ``geometry`` helpers, no planning
code, no margin order, no negative tree of ours): destinations come from hats
(``get_healpix_pixels`` + ``generate_negative_tree_pixels``); candidate cells come from the
rows' ``(ra, dec)`` (not their spatial index) at an order ``c`` chosen from the threshold
alone (the deepest with ``order2mindist(c) >= threshold``); a row is paired with every
destination overlapping the **2-ring** of its order-``c`` cell (cdshealpix ``neighbours``
twice, then a range lookup), twice the reach the threshold needs. Rows whose order-``j``
cell (``j < c``) has its 1-ring inside their partition are skipped first (the 2-ring of a
cell lies in the 1-ring of its parent). Above ``order2mindist(0)`` every destination whose
bounding cap comes within the threshold is a candidate, whatever the partition orders.
Candidates are then pruned or accepted with a bounding-cap test (distance to the pixel's
centre, certified circumradius), and the rest decided by
:func:`hats_margin.pixel_distance.within_threshold_of_pixel` (certified to 1e-9 relative).
The distances reported (missing, extra and borderline rows) come from
:func:`hats_margin.pixel_distance.distance_to_pixel_arcsec`.

Rows are matched by ``(pixel, spatial index, 64-bit hash of every column)``; the hash covers
the exact bits of fixed-width values and the full content of strings and nested values.

Memory
------
Primary partitions are streamed one at a time. The verifier keeps a few numbers per margin row
and per candidate (~60 bytes each); destinations are processed in batches of at most
``max_rows_in_memory`` margin rows (each batch re-reads only the partitions that can reach
it), so memory is bounded by one partition plus that budget, never by the catalog. (The
reach of a partition in that case assumes its rows' ``(ra, dec)`` lie inside it; rows that do
not are warned about.)

Cost: the first call in a process pays hats' numba compilation of
``generate_negative_tree_pixels`` (5-20 s); then ~5-10 s per million primary rows.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import cdshealpix.nested as cds
import hats
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.coordinates import Latitude, Longitude
from hats.pixel_math.healpix_shim import order2mindist
from upath import UPath

__all__ = ["VerifyReport", "main", "verify_margin"]

logger = logging.getLogger(__name__)

MAX_ORDER = 29
RING_STEPS = 2
"""Neighbour rings around a row's order-``c`` cell: one ring already reaches ``order2mindist(c)``
(>= the threshold), two give a 2x safety factor."""
PRUNE_STEP = 3
"""Levels between two interior-pruning passes of the candidate search."""
CAP_SAFETY = 1.001
"""Relative slack on bounding-cap radii and on the prune test (prunes are never near the threshold)."""
EXTRA_BINS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)
_ARCSEC_PER_RAD = 180.0 * 3600.0 / math.pi
_RING_CHUNK = 50_000
_LEAF = re.compile(r"^Norder=(\d+)/Dir=(\d+)/Npix=(\d+)([^/]*)(?:/([^/]+))?$")


# ------------------------------------------------------------------------------------ report
@dataclass
class VerifyReport:
    """What :func:`verify_margin` found. Counts are rows; ``*_examples`` hold at most
    ``max_examples`` dicts each."""

    margin_path: str
    primary_path: str
    threshold_arcsec: float
    exact: bool
    """True when extras count as failures (the margin claims fine filtering)."""
    pixels: int = 0
    """Margin pixels (files) compared."""
    rows_in_margin: int = 0
    rows_expected: int = 0
    primary_rows_read: int = 0
    missing: int = 0
    extra: int = 0
    altered: int = 0
    duplicates: int = 0
    borderline: int = 0
    self_rows: int = 0
    """Extra rows lying inside the pixel whose margin holds them (included in ``extra``)."""
    max_extra_distance_ratio: float = 0.0
    """Largest distance/threshold over the extra rows (0 when there is none)."""
    extra_histogram: dict[str, int] = field(default_factory=dict)
    structural: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing_examples: list[dict] = field(default_factory=list)
    extra_examples: list[dict] = field(default_factory=list)
    altered_examples: list[dict] = field(default_factory=list)
    duplicate_examples: list[dict] = field(default_factory=list)
    borderline_examples: list[dict] = field(default_factory=list)
    per_pixel: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)
    """(order, pixel) -> rows/expected/missing/extra/altered, for every pixel with any of them."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        failed = self.missing or self.altered or self.duplicates or self.structural
        return not failed and not (self.exact and self.extra)

    def summary(self) -> str:
        mode = "exact (extras fail)" if self.exact else "coarse (extras allowed)"
        lines = [
            f"margin   {self.margin_path}",
            f"primary  {self.primary_path}",
            (
                f"threshold {self.threshold_arcsec:g} arcsec, {mode}; {self.pixels} pixel file(s), "
                f"{self.rows_in_margin} margin rows, {self.rows_expected} expected, "
                f"{self.primary_rows_read} primary rows read, {self.seconds:.1f} s"
            ),
            f"result   {'OK' if self.ok else 'FAILED'}: {self.missing} missing, {self.extra} extra, "
            f"{self.altered} altered, {self.duplicates} duplicated, {len(self.structural)} structural problem(s)"
            + (f", {self.borderline} borderline" if self.borderline else ""),
        ]
        if self.extra:
            histogram = ", ".join(f"{k}: {v}" for k, v in self.extra_histogram.items() if v)
            lines.append(
                f"extra rows: max distance {self.max_extra_distance_ratio:.4g} x threshold ({histogram})"
                + (f"; {self.self_rows} inside their own pixel" if self.self_rows else "")
            )
        for title, problems in (("structural", self.structural), ("warning", self.warnings)):
            lines += [f"{title}: {p}" for p in problems]
        for title, examples in (
            ("missing", self.missing_examples),
            ("extra", self.extra_examples),
            ("altered", self.altered_examples),
            ("duplicate", self.duplicate_examples),
            ("borderline", self.borderline_examples),
        ):
            if examples:
                lines.append(f"{title} examples:")
                lines += [f"  {_format_example(e)}" for e in examples]
        return "\n".join(lines)


def _format_example(example: dict) -> str:
    parts = []
    for key, value in example.items():
        if isinstance(value, float):
            value = f"{value:.10g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------ entry
def verify_margin(
    margin_path,
    primary_path=None,
    *,
    threshold_arcsec: float | None = None,
    max_examples: int = 20,
    exact: bool | None = None,
    rtol: float = 1e-9,
    max_rows_in_memory: int = 20_000_000,
) -> VerifyReport:
    """Recompute every margin pixel of ``margin_path`` from ``primary_path`` and compare.

    Parameters
    ----------
    margin_path : str | Path | UPath
        The margin catalog directory.
    primary_path : str | Path | UPath | None
        The primary catalog (or a collection: its primary); default the margin's
        ``hats_primary_table_url`` (absolute, or relative to the working directory, the
        margin's parent directory or the one above).
    threshold_arcsec : float | None
        Default: the margin's ``hats_margin_threshold``.
    max_examples : int
        Examples kept per kind of problem.
    exact : bool | None
        Whether extra rows are failures. Default: the margin's ``hats_margin_fine_filtering``
        property (absent, as in hats-import margins, means coarse).
    rtol : float
        Rows within ``rtol * threshold`` of the threshold are *borderline*, not missing/extra.
    max_rows_in_memory : int
        Margin rows per batch of destination pixels (bounds memory; see the module docstring).
    """
    start = time.perf_counter()
    margin = _Margin(as_upath(margin_path))
    primary = _Primary(_resolve_primary(margin, primary_path))
    threshold = float(threshold_arcsec if threshold_arcsec is not None else margin.threshold_arcsec())
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold_arcsec must be a positive number of arcseconds, got {threshold!r}")
    if exact is None:
        exact = margin.properties.get("hats_margin_fine_filtering", "false").strip().lower() == "true"
    report = VerifyReport(str(margin.path), str(primary.path), threshold, bool(exact))
    _Verifier(margin, primary, threshold, report, max_examples, rtol, max_rows_in_memory).run()
    report.seconds = time.perf_counter() - start
    return report


def main(argv=None) -> int:
    """``hats-margin verify MARGIN [--primary CATALOG]``: print the summary; exit 1 unless ok."""
    parser = argparse.ArgumentParser(
        prog="hats-margin verify",
        description="Check a margin cache against its primary catalog (missing, extra, altered rows, structure).",
    )
    parser.add_argument("margin", help="margin catalog directory")
    parser.add_argument("--primary", default=None, help="primary catalog (default: hats_primary_table_url)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="arcsec (default: hats_margin_threshold)"
    )
    parser.add_argument("--max-examples", type=int, default=20)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--exact", dest="exact", action="store_true", default=None, help="extra rows fail")
    mode.add_argument("--coarse", dest="exact", action="store_false", help="extra rows are allowed")
    args = parser.parse_args(argv)
    report = verify_margin(
        args.margin,
        args.primary,
        threshold_arcsec=args.threshold,
        max_examples=args.max_examples,
        exact=args.exact,
    )
    print(report.summary())
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------------ paths
def as_upath(path) -> UPath:
    """A UPath; local paths are made absolute (file listings come back absolute)."""
    upath = path if isinstance(path, UPath) else UPath(path)
    if upath.protocol in ("", "file", "local"):
        return UPath(os.path.abspath(upath.path))
    return upath


def _location(path: UPath):
    if path.protocol in ("", "file", "local"):
        return path.path, None
    return path.path, path.fs


def _read_parquet(path: UPath) -> pa.Table:
    location, fs = _location(path)
    return pq.ParquetFile(location, filesystem=fs).read()


def _parse_properties(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _read_properties(catalog: UPath) -> dict[str, str]:
    for name in ("hats.properties", "properties"):
        if (catalog / name).exists():
            return _parse_properties((catalog / name).read_text())
    raise ValueError(f"{catalog} has no hats.properties (or properties) file: not a HATS catalog")


def _read_schema(catalog: UPath) -> pa.Schema | None:
    for name in ("_common_metadata", "_metadata"):
        pointer = catalog / "dataset" / name
        if pointer.exists():
            location, fs = _location(pointer)
            return pq.read_schema(location, filesystem=fs)
    return None


def _resolve_primary(margin: _Margin, primary_path) -> UPath:
    if primary_path is not None:
        return as_upath(primary_path)
    url = margin.properties.get("hats_primary_table_url")
    if not url:
        raise ValueError(f"{margin.path} has no hats_primary_table_url: pass primary_path")
    candidates = [as_upath(url)]
    if "://" not in url and not url.startswith("/"):  # relative: to the cwd, a collection, its parent
        candidates += [margin.path.parent / url, margin.path.parent.parent / url]
    for candidate in candidates:
        if (candidate / "hats.properties").exists() or (candidate / "properties").exists():
            return candidate
    raise ValueError(
        f"hats_primary_table_url={url!r} of {margin.path} is not a catalog (tried "
        f"{', '.join(str(c) for c in candidates)}): pass primary_path"
    )


def _same_columns(schema: pa.Schema, reference: pa.Schema) -> bool:
    return [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in reference]


def _conform(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table | None, str | None]:
    """The table with the columns and types of ``schema``, or (None, why not)."""
    absent = [n for n in schema.names if n not in table.column_names]
    if absent:
        return None, f"has no column(s) {absent}"
    table = table.select(schema.names)
    if _same_columns(table.schema, schema):
        return table, None
    try:
        return table.cast(schema), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        return None, f"cannot be cast to the primary schema ({exc})"


# ------------------------------------------------------------------------------------ catalogs
class _Margin:
    """The margin catalog: its properties and its files per pixel (found by listing dataset/)."""

    def __init__(self, path: UPath):
        self.path = path
        if not path.exists():
            raise ValueError(f"margin {path} does not exist")
        self.properties = _read_properties(path)
        self.files: dict[tuple[int, int], list[UPath]] = {}
        self.bad_dir: list[str] = []
        self.stray: list[str] = []
        dataset = path / "dataset"
        if not dataset.exists():
            return
        root = dataset.path.rstrip("/")
        for found in sorted(dataset.fs.find(dataset.path)):
            relative = found[len(root) :].lstrip("/")
            name = relative.rsplit("/", 1)[-1]
            if name.startswith(("_", ".")):
                continue
            match = _LEAF.match(relative)
            if not match:
                self.stray.append(relative)
                continue
            order, directory, pixel = (int(match.group(i)) for i in (1, 2, 3))
            if directory != (pixel // 10000) * 10000:
                self.bad_dir.append(relative)
            self.files.setdefault((order, pixel), []).append(dataset / relative)

    def threshold_arcsec(self) -> float:
        value = self.properties.get("hats_margin_threshold")
        if value is None:
            raise ValueError(f"{self.path} has no hats_margin_threshold property: pass threshold_arcsec")
        return float(value)


class _Primary:
    """The primary catalog as hats sees it: partitions, negative tree, schema, columns."""

    def __init__(self, path: UPath):
        catalog = hats.read_hats(path)
        if hasattr(catalog, "main_catalog"):  # a collection: its primary catalog
            path, catalog = as_upath(catalog.main_catalog_dir), catalog.main_catalog
        self.path = path
        info = catalog.catalog_info
        if str(info.catalog_type) not in ("object", "source"):
            raise ValueError(
                f"primary {path} is a {info.catalog_type!s} catalog, not an object/source catalog"
            )
        self.partitions = [(p.order, p.pixel) for p in catalog.get_healpix_pixels()]
        self.negative = [(p.order, p.pixel) for p in catalog.generate_negative_tree_pixels()]
        self.schema = _read_schema(path)
        if self.schema is None:
            raise ValueError(
                f"primary {path} has no dataset/_common_metadata or _metadata: its schema is unknown"
            )
        self.ra_column, self.dec_column = info.ra_column, info.dec_column
        self.healpix_column = info.healpix_column or "_healpix_29"
        self.healpix_order = int(info.healpix_order if info.healpix_order is not None else MAX_ORDER)
        self.npix_suffix = info.npix_suffix or ".parquet"
        for column in (self.ra_column, self.dec_column, self.healpix_column):
            if column not in self.schema.names:
                raise ValueError(f"primary {path}: column {column!r} is not in its schema")

    def read_partition(self, order: int, pixel: int) -> pa.Table:
        leaf = self.path / "dataset" / f"Norder={order}" / f"Dir={(pixel // 10000) * 10000}"
        if self.npix_suffix in ("/", "\\"):
            leaf = leaf / f"Npix={pixel}"
            files = sorted(f for f in leaf.iterdir() if f.is_file() and not f.name.startswith(("_", ".")))
        else:
            files = [leaf / f"Npix={pixel}{self.npix_suffix}"]
        tables = []
        for file in files:
            table, why = _conform(_read_parquet(file), self.schema)
            if table is None:
                raise ValueError(f"primary partition file {file} {why}")
            tables.append(table)
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


# ------------------------------------------------------------------------------------ tiles
class _Tiles:
    """Partitions + negative tree as disjoint order-29 ranges, sorted."""

    def __init__(self, pixels: list[tuple[int, int]]):
        orders = np.array([o for o, _ in pixels], dtype=np.int64)
        nums = np.array([p for _, p in pixels], dtype=np.int64)
        starts = nums << (2 * (MAX_ORDER - orders))
        sort = np.argsort(starts, kind="stable")
        self.orders, self.pixels, self.starts = orders[sort], nums[sort], starts[sort]
        self.ends = (self.pixels + 1) << (2 * (MAX_ORDER - self.orders))
        self.index = {(int(o), int(p)): i for i, (o, p) in enumerate(zip(self.orders, self.pixels))}
        self._centers = None
        self._radii = None

    def __len__(self):
        return len(self.orders)

    def check_cover(self) -> str | None:
        full = 12 << (2 * MAX_ORDER)
        if (
            len(self) == 0
            or self.starts[0] != 0
            or self.ends[-1] != full
            or np.any(self.starts[1:] != self.ends[:-1])
        ):
            return "the primary's partitions and negative tree do not tile the sphere exactly"
        return None

    def containing(self, position29: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, position29, side="right") - 1

    def overlapping(self, order: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (query index, tile index) of every tile overlapping each order-``order`` cell."""
        shift = 2 * (MAX_ORDER - order)
        lo = np.searchsorted(self.ends, cells << shift, side="right")
        hi = np.searchsorted(self.starts, (cells + 1) << shift, side="left")
        counts = hi - lo
        query = np.repeat(np.arange(len(cells), dtype=np.int64), counts)
        return query, np.repeat(lo, counts) + _ranks(counts)

    def caps(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit vector of each tile's centre and a radius (rad) bounding its closed region."""
        if self._centers is None:
            centers = np.zeros((len(self), 3))
            radii = np.zeros(len(self))
            for order in np.unique(self.orders):
                sel = np.flatnonzero(self.orders == order)
                lon, lat = cds.healpix_to_lonlat(self.pixels[sel].astype(np.uint64), int(order))
                center = _unit(lon.to_value("rad"), lat.to_value("rad"))
                vlon, vlat = cds.vertices(self.pixels[sel].astype(np.uint64), int(order), step=16)
                edge = _unit(vlon.to_value("rad"), vlat.to_value("rad"))
                radius = _angle(edge, center[:, None, :]).max(axis=1)
                centers[sel], radii[sel] = center, radius * CAP_SAFETY + 1e-12
            self._centers, self._radii = centers, radii
        return self._centers, self._radii


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..n-1 within each run of a repeat(…, counts) expansion."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def _unit(lon_rad, lat_rad) -> np.ndarray:
    cos_lat = np.cos(lat_rad)
    return np.stack([cos_lat * np.cos(lon_rad), cos_lat * np.sin(lon_rad), np.sin(lat_rad)], axis=-1)


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (rad) between unit vectors, atan2(|a x b|, a . b)."""
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    return np.arctan2(cross, np.sum(a * b, axis=-1))


def cell_order_for(threshold_arcsec: float) -> int | None:
    """The deepest order whose minimum cell width (hats ``order2mindist``) is >= the threshold,
    or None when even order-0 cells are narrower (then every destination is a candidate)."""
    for order in range(MAX_ORDER, -1, -1):
        if float(order2mindist(order)) * 60.0 >= threshold_arcsec:
            return order
    return None


def _ring_tiles(tiles: _Tiles, cells: np.ndarray, order: int, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique pairs (cell index, tile index): the tiles overlapping each cell's ``rings``-ring
    (the cell and every cell reached in ``rings`` neighbour steps; cdshealpix lists all the
    cells that touch a cell, 7 or 8 of them)."""
    owners, found = [], []
    n_tiles = len(tiles)
    for lo in range(0, len(cells), _RING_CHUNK):
        chunk = cells[lo : lo + _RING_CHUNK]
        ring = chunk[:, None]
        for _ in range(rings):
            nbrs = cds.neighbours(ring.reshape(-1).astype(np.uint64), order).astype(np.int64)
            ring = nbrs.reshape(len(chunk), -1)
            ring = np.where(ring < 0, chunk[:, None], ring)  # a missing neighbour: reuse the cell
        ring.sort(axis=1)
        keep = np.ones(ring.shape, dtype=bool)
        keep[:, 1:] = ring[:, 1:] != ring[:, :-1]
        owner = np.nonzero(keep)[0] + lo
        query, tile = tiles.overlapping(order, ring[keep])
        key = np.unique(owner[query] * n_tiles + tile)
        owners.append(key // n_tiles)
        found.append(key % n_tiles)
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(owners), np.concatenate(found)


# ------------------------------------------------------------------------------------ hashing
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_NULL = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _column_hash(column) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    n = len(array)
    try:
        width = kind.bit_width
    except ValueError:
        width = 0
    if pa.types.is_boolean(kind):
        values = array.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint64)
    elif width in (8, 16, 32, 64) and len(array.buffers()) == 2:
        raw = np.frombuffer(array.buffers()[1], dtype=f"u{width // 8}", count=array.offset + n)
        values = raw[array.offset :].astype(np.uint64)
    elif (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        values = _bytes_hash(array)
    else:  # nested, decimal, ...: the exact python value (repr of floats round-trips)
        values = pd.util.hash_array(np.array([repr(v) for v in array.to_pylist()], dtype=object))
    values = _mix(values.astype(np.uint64, copy=False))
    if array.null_count:
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        values = np.where(valid, values, _NULL)
    return values


def _bytes_hash(array: pa.Array) -> np.ndarray:
    """Polynomial hash (mod 2**64) of each value's bytes, and its length; vectorised."""
    n = len(array)
    offsets_dtype = (
        np.int64
        if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
        else (np.int32)
    )
    offsets = np.frombuffer(array.buffers()[1], dtype=offsets_dtype, count=array.offset + n + 1)[
        array.offset :
    ]
    offsets = offsets.astype(np.int64)
    data = array.buffers()[2]
    lengths = np.diff(offsets)
    first, total = int(offsets[0]), int(offsets[-1] - offsets[0])
    if total == 0:
        return lengths.astype(np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8, count=first + total)[first:].astype(np.uint64)
    longest = int(lengths.max())
    powers = np.cumprod(np.full(longest, np.uint64(1099511628211), dtype=np.uint64))  # wraps mod 2**64
    position = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1] - first, lengths)
    weighted = (raw + np.uint64(1)) * powers[position]
    sums = np.zeros(n, dtype=np.uint64)
    nonempty = np.flatnonzero(lengths > 0)
    sums[nonempty] = np.add.reduceat(weighted, (offsets[:-1] - first)[nonempty])
    return sums ^ (lengths.astype(np.uint64) << np.uint64(40))


def _row_hashes(table: pa.Table) -> np.ndarray:
    result = np.zeros(table.num_rows, dtype=np.uint64)
    for i, column in enumerate(table.columns):
        result = _mix(result * np.uint64(31) + _column_hash(column) + np.uint64(i + 1))
    return result


# ------------------------------------------------------------------------------------ distance
def _distance_arcsec(ra_deg: np.ndarray, dec_deg: np.ndarray, order: int, pixel: int) -> np.ndarray:
    from hats_margin.pixel_distance import distance_to_pixel_arcsec

    return np.asarray(distance_to_pixel_arcsec(ra_deg, dec_deg, int(order), int(pixel)), dtype=np.float64)


def _within(
    ra_deg: np.ndarray, dec_deg: np.ndarray, order: int, pixel: int, threshold_arcsec: float
) -> np.ndarray:
    from hats_margin.pixel_distance import within_threshold_of_pixel

    return np.asarray(
        within_threshold_of_pixel(ra_deg, dec_deg, int(order), int(pixel), threshold_arcsec), dtype=bool
    )


# ------------------------------------------------------------------------------------ verifier
class _Keys:
    """Columns of row keys gathered for one batch: tile, spidx, hash and named extras."""

    def __init__(self, **extra_dtypes):
        self.dtypes = {"tile": np.int64, "spidx": np.int64, "hash": np.uint64, **extra_dtypes}
        self.parts: dict[str, list] = {key: [] for key in self.dtypes}

    def add(self, tile, spidx, hashes, **extra):
        for key, value in {"tile": tile, "spidx": spidx, "hash": hashes, **extra}.items():
            self.parts[key].append(np.asarray(value, dtype=self.dtypes[key]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            key: np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtypes[key])
            for key, parts in self.parts.items()
        }


class _Verifier:
    def __init__(self, margin, primary, threshold, report, max_examples, rtol, max_rows_in_memory):
        self.margin, self.primary, self.report = margin, primary, report
        self.threshold = threshold
        self.max_examples, self.rtol = max_examples, rtol
        self.budget = max(1, int(max_rows_in_memory))
        self.tiles = _Tiles(primary.partitions + primary.negative)
        self.cell_order = cell_order_for(threshold)
        self.shift_index = 2 * (MAX_ORDER - primary.healpix_order)
        self.sources = [self.tiles.index[p] for p in primary.partitions]
        self._counted = set()
        self._extra_ratios: list[np.ndarray] = []

    # ---------------------------------------------------------------- orchestration
    def run(self):
        report = self.report
        problem = self.tiles.check_cover()
        if problem:
            report.structural.append(problem)
        file_rows = self._check_structure()
        report.pixels = len(file_rows)
        for number, batch in enumerate(self._batches(file_rows)):
            logger.debug("verify %s: batch %d, %d destination pixels", self.margin.path, number, len(batch))
            self._run_batch(batch)
        self._finish_histogram()

    def _batches(self, file_rows: dict[int, int]):
        """Destination tiles in nested order, cut into batches of <= budget margin rows. Every
        tile is in exactly one batch (tiles without a file may still be owed rows)."""
        batch, rows = [], 0
        for tile in range(len(self.tiles)):
            n = file_rows.get(tile, 0)
            if batch and rows + n > self.budget:
                yield np.array(batch)
                batch, rows = [], 0
            batch.append(tile)
            rows += n
        if batch:
            yield np.array(batch)

    # ---------------------------------------------------------------- structure
    def _check_structure(self) -> dict[int, int]:
        """Structural checks that need no row comparison; returns rows per valid tile file."""
        report, margin, primary = self.report, self.margin, self.primary
        props = margin.properties
        if props.get("dataproduct_type") != "margin":
            report.structural.append(f"dataproduct_type is {props.get('dataproduct_type')!r}, not 'margin'")
        for key, expected in (
            ("hats_col_ra", primary.ra_column),
            ("hats_col_dec", primary.dec_column),
            ("hats_col_healpix", primary.healpix_column),
        ):
            if props.get(key) is not None and props.get(key) != expected:
                report.structural.append(f"{key}={props.get(key)!r} but the primary's is {expected!r}")
        if "hats_margin_threshold" in props and float(props["hats_margin_threshold"]) < self.threshold * (
            1 - 1e-12
        ):
            report.warnings.append(
                f"hats_margin_threshold={props['hats_margin_threshold']} is below the checked threshold {self.threshold:g}"
            )
        common = _read_schema(margin.path)
        if common is None:
            report.structural.append(
                "dataset/_common_metadata (and _metadata) missing: the margin has no schema"
            )
        elif not _same_columns(common, primary.schema):
            report.structural.append(
                f"dataset/_common_metadata schema differs from the primary's: {_schema_diff(common, primary.schema)}"
            )
        elif not common.equals(primary.schema, check_metadata=True):
            report.warnings.append("dataset/_common_metadata key/value metadata differs from the primary's")
        for relative in margin.bad_dir:
            report.structural.append(f"{relative}: Dir= does not match Npix (hats would not find this file)")
        for relative in margin.stray:
            report.warnings.append(f"dataset/{relative}: not a Norder=/Dir=/Npix= leaf, ignored")

        file_rows: dict[int, int] = {}
        total = 0
        footers: dict[str, int] = {}
        for pixel, files in sorted(margin.files.items()):
            rows = 0
            for file in files:
                location, fs = _location(file)
                try:
                    meta = pq.read_metadata(location, filesystem=fs)
                    schema = pq.read_schema(location, filesystem=fs)
                except (OSError, pa.ArrowInvalid) as exc:
                    report.structural.append(f"{file}: not a readable parquet file ({exc})")
                    continue
                rows += meta.num_rows
                footers[str(file)] = meta.num_rows
                if not _same_columns(schema, primary.schema):
                    report.structural.append(
                        f"pixel {pixel[0]}/{pixel[1]}: schema differs from the primary's: "
                        f"{_schema_diff(schema, primary.schema)}"
                    )
            total += rows
            if rows == 0:
                report.warnings.append(f"pixel {pixel[0]}/{pixel[1]}: empty file(s)")
            if pixel in self.tiles.index:
                file_rows[self.tiles.index[pixel]] = rows
            else:
                report.structural.append(
                    f"pixel {pixel[0]}/{pixel[1]} ({rows} rows) is neither a partition nor a negative-tree pixel "
                    "of the primary"
                )
        report.rows_in_margin = total
        nrows = props.get("hats_nrows")
        if nrows is None:
            report.structural.append("hats_nrows is missing from the properties")
        elif int(nrows) != total:
            report.structural.append(f"hats_nrows={nrows} but the files hold {total} rows")
        self._check_partition_info()
        self._check_metadata_file(footers)
        return file_rows

    def _check_partition_info(self):
        path = self.margin.path / "partition_info.csv"
        if not path.exists():
            self.report.warnings.append("partition_info.csv is missing")
            return
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        listed = []
        for line in lines[1:]:
            try:
                order, pixel = (int(v) for v in line.split(",")[:2])
            except ValueError:
                self.report.structural.append(f"partition_info.csv: unreadable line {line!r}")
                continue
            listed.append((order, pixel))
        files = set(self.margin.files)
        if len(set(listed)) != len(listed):
            self.report.structural.append("partition_info.csv lists a pixel more than once")
        for pixel in sorted(set(listed) - files):
            self.report.structural.append(
                f"partition_info.csv lists {pixel[0]}/{pixel[1]}, which has no file"
            )
        for pixel in sorted(files - set(listed)):
            self.report.structural.append(
                f"pixel {pixel[0]}/{pixel[1]} has a file but is not in partition_info.csv"
            )

    def _check_metadata_file(self, footers: dict[str, int]):
        pointer = self.margin.path / "dataset" / "_metadata"
        if not pointer.exists():
            return
        location, fs = _location(pointer)
        try:
            meta = pq.read_metadata(location, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            self.report.structural.append(f"dataset/_metadata is unreadable ({exc})")
            return
        listed: dict[str, int] = {}
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            path = group.column(0).file_path if group.num_columns else ""
            listed[path] = listed.get(path, 0) + group.num_rows
        dataset = str(self.margin.path / "dataset").rstrip("/") + "/"
        actual = {name[len(dataset) :]: n for name, n in footers.items()}
        if listed != actual:
            wrong = sorted(set(listed) ^ set(actual)) or sorted(
                k for k in listed if listed[k] != actual.get(k)
            )
            self.report.structural.append(
                f"dataset/_metadata does not describe the files ({meta.num_rows} rows listed, "
                f"{sum(actual.values())} in files; first differences: {wrong[:3]})"
            )

    # ---------------------------------------------------------------- one batch
    def _run_batch(self, batch: np.ndarray):
        in_batch = np.zeros(len(self.tiles), dtype=bool)
        in_batch[batch] = True
        margin = self._read_margin_keys(batch)
        order = np.argsort(margin["spidx"], kind="stable")
        sorted_spidx = margin["spidx"][order]
        n_margin = len(order)
        primary_has = np.zeros(n_margin, dtype=bool)
        known_source = np.full(n_margin, -1, dtype=np.int64)
        expected = _Keys(ratio=np.float64, ra=np.float64, dec=np.float64, source=np.int64)
        for source in self._sources_reaching(in_batch):
            self._scan_source(
                source, in_batch, sorted_spidx, order, margin, primary_has, known_source, expected
            )
        self._compare(self._decide(expected.arrays()), margin, primary_has, known_source)

    def _read_margin_keys(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        keys = _Keys(ra=np.float64, dec=np.float64, row=np.int64)
        schema = self.primary.schema
        for tile in batch:
            pixel = (int(self.tiles.orders[tile]), int(self.tiles.pixels[tile]))
            files = self.margin.files.get(pixel)
            if not files:
                continue
            parts = []
            for file in files:
                try:
                    table = _read_parquet(file)
                except (OSError, pa.ArrowInvalid):
                    continue  # already reported by the structure check
                table, why = _conform(table, schema)
                if table is None:
                    self.report.structural.append(f"{file}: {why}; its rows cannot be compared")
                    continue
                parts.append(table)
            if not parts:
                continue
            table = pa.concat_tables(parts)
            n = table.num_rows
            keys.add(
                np.full(n, tile),
                table.column(self.primary.healpix_column).fill_null(-1).to_numpy(),
                _row_hashes(table),
                ra=table.column(self.primary.ra_column).to_numpy(zero_copy_only=False).astype(np.float64),
                dec=table.column(self.primary.dec_column).to_numpy(zero_copy_only=False).astype(np.float64),
                row=np.arange(n, dtype=np.int64),
            )
        return keys.arrays()

    def _sources_reaching(self, in_batch: np.ndarray) -> list[int]:
        if in_batch.all():
            return self.sources
        tiles, reach = self.tiles, []
        if self.cell_order is None:
            return self.sources
        for source in self.sources:
            order = int(tiles.orders[source])
            level = min(self.cell_order, order)
            cell = np.array([int(tiles.pixels[source]) >> (2 * (order - level))], dtype=np.int64)
            _, found = _ring_tiles(tiles, cell, level, RING_STEPS)
            if in_batch[found].any():
                reach.append(source)
        return reach

    def _scan_source(
        self, source, in_batch, sorted_spidx, order, margin, primary_has, known_source, expected
    ):
        s_order, s_pixel = int(self.tiles.orders[source]), int(self.tiles.pixels[source])
        table = self.primary.read_partition(s_order, s_pixel)
        n = table.num_rows
        if (s_order, s_pixel) not in self._counted:
            self._counted.add((s_order, s_pixel))
            self.report.primary_rows_read += n
        if n == 0:
            return
        hcol = table.column(self.primary.healpix_column)
        if hcol.null_count:
            raise ValueError(f"primary partition {s_order}/{s_pixel}: null spatial index values")
        spidx = hcol.to_numpy().astype(np.int64, copy=False)
        ra = table.column(self.primary.ra_column).to_numpy(zero_copy_only=False).astype(np.float64)
        dec = table.column(self.primary.dec_column).to_numpy(zero_copy_only=False).astype(np.float64)
        own = self.tiles.containing(spidx << self.shift_index)
        outside = int((own != source).sum())
        if outside:
            self._warn_once(
                f"primary partition {s_order}/{s_pixel}: {outside} row(s) have a spatial index outside it "
                "(their own pixel is taken from the spatial index)"
            )

        rows, dest = self._candidates(ra, dec, own, source, in_batch)
        rows, dest, ratio = self._cap_test(ra, dec, rows, dest)
        exp_rows, exp_tiles = rows, dest

        # margin rows whose spatial index occurs in this partition
        lo = np.searchsorted(sorted_spidx, spidx, side="left")
        hi = np.searchsorted(sorted_spidx, spidx, side="right")
        counts = hi - lo
        matched_rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        matched_margin = order[np.repeat(lo, counts) + _ranks(counts)]

        need = np.unique(np.concatenate([exp_rows, matched_rows]))
        hashes = np.zeros(n, dtype=np.uint64)
        if len(need):
            hashes[need] = _row_hashes(table.take(pa.array(need)))
        if len(matched_rows):  # several rows may share a spatial index: set flags, never overwrite them
            known_source[matched_margin] = source
            primary_has[matched_margin[hashes[matched_rows] == margin["hash"][matched_margin]]] = True
        if len(exp_rows):
            expected.add(
                exp_tiles,
                spidx[exp_rows],
                hashes[exp_rows],
                ratio=ratio,
                ra=ra[exp_rows],
                dec=dec[exp_rows],
                source=np.full(len(exp_rows), source),
            )

    def _warn_once(self, message: str):
        if message not in self.report.warnings:
            self.report.warnings.append(message)

    # ---------------------------------------------------------------- candidates
    def _candidates(self, ra, dec, own, source, in_batch) -> tuple[np.ndarray, np.ndarray]:
        """(row, tile) pairs that may satisfy the contract, tile != the row's own tile, tile in batch."""
        tiles = self.tiles
        c = self.cell_order
        finite = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)  # other rows are in no margin
        cell29 = np.full(len(ra), -1, dtype=np.int64)
        cell29[finite] = cds.lonlat_to_healpix(
            Longitude(ra[finite], unit="deg"), Latitude(dec[finite], unit="deg"), MAX_ORDER
        ).astype(np.int64)
        k, s_pixel = int(tiles.orders[source]), int(tiles.pixels[source])
        consistent = (own == source) & ((cell29 >> (2 * (MAX_ORDER - k))) == s_pixel)
        stray = int((finite & ~consistent & (own == source)).sum())
        if stray:
            self._warn_once(f"primary partition {k}/{s_pixel}: {stray} row(s) whose (ra, dec) lie outside it")
        if not finite.all():
            self._warn_once(
                f"primary partition {k}/{s_pixel}: {int((~finite).sum())} row(s) without a valid (ra, dec), "
                "in no margin"
            )
        if c is None:
            return self._all_tile_candidates(consistent, ~consistent & finite, own, source, in_batch)
        active = np.flatnonzero(consistent)
        # coarse-to-fine: drop rows whose order-j cell has its 1-ring inside the source. The
        # 2-ring of an order-(j+1) cell lies in the 1-ring of its parent, and the 2-ring of a
        # cell lies in the 2-ring of its parent, so the order-c 2-ring of those rows is inside too.
        # (every third level: each cdshealpix call costs ~0.4 ms, more than the cells it would drop)
        for level in sorted(range(c - 1, k, -PRUNE_STEP)):
            if len(active) == 0:
                break
            cells, inv = np.unique(cell29[active] >> (2 * (MAX_ORDER - level)), return_inverse=True)
            owner, tile = _ring_tiles(tiles, cells, level, 1)
            n_tiles = np.bincount(owner, minlength=len(cells))
            first = np.full(len(cells), -1, dtype=np.int64)
            first[owner[::-1]] = tile[::-1]
            interior = (n_tiles == 1) & (first == source)
            active = active[~interior[inv]]
        rows = (
            np.concatenate([active, np.flatnonzero(~consistent & finite)]) if not consistent.all() else active
        )
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cells, inv = np.unique(cell29[rows] >> (2 * (MAX_ORDER - c)), return_inverse=True)
        owner, tile = _ring_tiles(tiles, cells, c, RING_STEPS)
        keep = in_batch[tile]
        owner, tile = owner[keep], tile[keep]
        # expand (cell, tile) to (row, tile)
        by_cell = np.argsort(inv, kind="stable")
        per_cell = np.bincount(inv, minlength=len(cells))
        first_row = np.cumsum(per_cell) - per_cell
        counts = per_cell[owner]
        pair_rows = rows[by_cell[np.repeat(first_row[owner], counts) + _ranks(counts)]]
        pair_tiles = np.repeat(tile, counts)
        keep = pair_tiles != own[pair_rows]
        return pair_rows[keep], pair_tiles[keep]

    def _all_tile_candidates(self, consistent, stray, own, source, in_batch):
        """Threshold wider than order-0 cells: every destination whose cap comes within the
        threshold of the source's cap (every destination for rows lying outside their partition)."""
        centers, radii = self.tiles.caps()
        limit = self.threshold / _ARCSEC_PER_RAD * CAP_SAFETY
        gap = _angle(centers, centers[source][None, :]) - radii - radii[source]
        pairs = []
        for rows, tiles in (
            (np.flatnonzero(consistent), np.flatnonzero((gap <= limit) & in_batch)),
            (np.flatnonzero(stray), np.flatnonzero(in_batch)),
        ):
            pairs.append((np.tile(rows, len(tiles)), np.repeat(tiles, len(rows))))
        pair_rows = np.concatenate([p[0] for p in pairs])
        pair_tiles = np.concatenate([p[1] for p in pairs])
        keep = pair_tiles != own[pair_rows]
        return pair_rows[keep], pair_tiles[keep]

    def _cap_test(self, ra, dec, rows, dest):
        """Drop (row, tile) candidates that a bounding cap proves farther than the threshold.
        Returns the kept pairs and their ratio: 0 where the tile's centre (inside the tile) is
        within the threshold, NaN where the exact distance is still needed."""
        centers, radii = self.tiles.caps()
        thr_rad = self.threshold / _ARCSEC_PER_RAD
        to_center = _angle(_unit(np.radians(ra[rows]), np.radians(dec[rows])), centers[dest])
        keep = to_center - radii[dest] <= thr_rad * CAP_SAFETY
        ratio = np.where(to_center <= thr_rad * (1 - 1e-12), 0.0, np.nan)
        return rows[keep], dest[keep], ratio[keep]

    def _decide(self, candidates: dict) -> dict:
        """Keep the candidates within the threshold, one ``within_threshold_of_pixel`` call per
        tile for those the cap test left undecided. Ratios stay NaN until a report needs them."""
        pending = np.flatnonzero(np.isnan(candidates["ratio"]))
        keep = np.ones(len(candidates["ratio"]), dtype=bool)
        tiles = candidates["tile"][pending]
        if len(pending):
            sort = np.argsort(tiles, kind="stable")
            bounds = np.flatnonzero(np.diff(tiles[sort])) + 1
            for group in np.split(pending[sort], bounds):
                tile = int(candidates["tile"][group[0]])
                keep[group] = _within(
                    candidates["ra"][group],
                    candidates["dec"][group],
                    int(self.tiles.orders[tile]),
                    int(self.tiles.pixels[tile]),
                    self.threshold,
                )
        return {key: value[keep] for key, value in candidates.items()}

    def _ratios(self, ra, dec, tiles) -> np.ndarray:
        """distance / threshold of each point to its tile, one distance call per tile."""
        ratio = np.zeros(len(tiles))
        if len(tiles) == 0:
            return ratio
        sort = np.argsort(tiles, kind="stable")
        bounds = np.flatnonzero(np.diff(tiles[sort])) + 1
        for group in np.split(sort, bounds):
            tile = int(tiles[group[0]])
            order, pixel = int(self.tiles.orders[tile]), int(self.tiles.pixels[tile])
            ratio[group] = _distance_arcsec(ra[group], dec[group], order, pixel) / self.threshold
        return ratio

    # ---------------------------------------------------------------- comparison
    def _compare(self, expected: dict, margin: dict, primary_has: np.ndarray, known_source: np.ndarray):
        report = self.report
        n_exp, n_mar = len(expected["tile"]), len(margin["tile"])
        report.rows_expected += n_exp
        tile = np.concatenate([expected["tile"], margin["tile"]])
        spidx = np.concatenate([expected["spidx"], margin["spidx"]])
        hashes = np.concatenate([expected["hash"], margin["hash"]])
        is_margin = np.concatenate([np.zeros(n_exp, bool), np.ones(n_mar, bool)])
        sort = np.lexsort((is_margin, hashes, spidx, tile))
        if len(sort) == 0:
            return
        t, s, h, m = tile[sort], spidx[sort], hashes[sort], is_margin[sort]
        new_group = np.ones(len(sort), dtype=bool)
        new_group[1:] = (t[1:] != t[:-1]) | (s[1:] != s[:-1]) | (h[1:] != h[:-1])
        group = np.cumsum(new_group) - 1
        e_count = np.bincount(group, weights=~m, minlength=group[-1] + 1).astype(np.int64)
        m_count = np.bincount(group, weights=m, minlength=group[-1] + 1).astype(np.int64)
        rank = _ranks(np.bincount(group))  # position inside the group (expected rows first)
        # expected rows beyond the margin's copies are missing
        e_rank = rank
        missing_pos = sort[(~m) & (e_rank >= m_count[group])]
        # margin rows beyond the expected copies: the first of a group with e == 0 is unexpected,
        # the others are duplicates
        m_rank = rank - e_count[group]
        surplus = m & (m_rank >= e_count[group])
        unexpected_pos = sort[surplus & (e_count[group] == 0) & (m_rank == 0)] - n_exp
        duplicate_pos = sort[surplus & ((e_count[group] > 0) | (m_rank > 0))] - n_exp
        self._record_duplicates(duplicate_pos, margin)

        is_copy = primary_has[unexpected_pos]
        altered_pos = unexpected_pos[~is_copy]
        extra_pos = unexpected_pos[is_copy]

        # a missing row that has an altered stand-in (same pixel and spatial index) counts once
        missing_pos = self._record_missing(self._absorb(missing_pos, expected, altered_pos, margin), expected)
        self._record_altered(altered_pos, margin, known_source)
        extra_pos = self._record_extra(extra_pos, margin)
        self._per_pixel(expected, margin, missing_pos, altered_pos, extra_pos)

    def _absorb(self, missing_pos, expected, altered_pos, margin) -> np.ndarray:
        if len(missing_pos) == 0 or len(altered_pos) == 0:
            return missing_pos
        keys = {(int(a), int(b)) for a, b in zip(margin["tile"][altered_pos], margin["spidx"][altered_pos])}
        stand_in = np.array(
            [
                (int(a), int(b)) in keys
                for a, b in zip(expected["tile"][missing_pos], expected["spidx"][missing_pos])
            ],
            dtype=bool,
        )
        return missing_pos[~stand_in]

    def _pixel_of(self, tile) -> str:
        return f"{int(self.tiles.orders[tile])}/{int(self.tiles.pixels[tile])}"

    def _record_missing(self, pos, expected) -> np.ndarray:
        """Count and describe missing rows (borderline ones aside); returns the missing ones."""
        ratio = expected["ratio"][pos]
        unknown = np.isnan(ratio)
        ratio[unknown] = self._ratios(
            expected["ra"][pos[unknown]], expected["dec"][pos[unknown]], expected["tile"][pos[unknown]]
        )
        expected["ratio"][pos] = ratio
        border = ratio >= 1.0 - self.rtol
        self._record_borderline(
            [
                {
                    "kind": "missing",
                    "pixel": self._pixel_of(expected["tile"][p]),
                    "spatial_index": int(expected["spidx"][p]),
                    "distance_ratio": float(expected["ratio"][p]),
                }
                for p in pos[border][: self.max_examples]
            ],
            int(border.sum()),
        )
        pos = pos[~border]
        self.report.missing += len(pos)
        room = self.max_examples - len(self.report.missing_examples)
        for p in pos[: max(room, 0)]:
            self.report.missing_examples.append(
                {
                    "pixel": self._pixel_of(expected["tile"][p]),
                    "spatial_index": int(expected["spidx"][p]),
                    "source": self._pixel_of(expected["source"][p]),
                    "ra": float(expected["ra"][p]),
                    "dec": float(expected["dec"][p]),
                    "distance_ratio": float(expected["ratio"][p]),
                }
            )
        return pos

    def _record_borderline(self, examples, count):
        self.report.borderline += count
        room = self.max_examples - len(self.report.borderline_examples)
        self.report.borderline_examples += examples[: max(room, 0)]

    def _record_altered(self, pos, margin, known_source):
        self.report.altered += len(pos)
        room = self.max_examples - len(self.report.altered_examples)
        for p in pos[: max(room, 0)]:
            tile, source = int(margin["tile"][p]), int(known_source[p])
            example = {
                "pixel": self._pixel_of(tile),
                "row": int(margin["row"][p]),
                "spatial_index": int(margin["spidx"][p]),
            }
            if source < 0:
                example["problem"] = "no primary row has this spatial index"
            else:
                example["source"] = self._pixel_of(source)
                example["differs"] = (
                    ",".join(self._differing_columns(tile, int(margin["row"][p]), source)) or "?"
                )
            self.report.altered_examples.append(example)

    def _differing_columns(self, tile: int, row: int, source: int) -> list[str]:
        """Columns in which a margin row differs from the closest primary row with its spatial index."""
        pixel = (int(self.tiles.orders[tile]), int(self.tiles.pixels[tile]))
        schema = self.primary.schema
        parts = []
        for file in self.margin.files.get(pixel, []):
            table, _ = _conform(_read_parquet(file), schema)
            if table is not None:
                parts.append(table)
        if not parts:
            return []
        margin_row = pa.concat_tables(parts).slice(row, 1).to_pylist()[0]
        table = self.primary.read_partition(int(self.tiles.orders[source]), int(self.tiles.pixels[source]))
        spidx = table.column(self.primary.healpix_column).to_numpy()
        candidates = table.take(pa.array(np.flatnonzero(spidx == margin_row[self.primary.healpix_column])))
        best = None
        for primary_row in candidates.to_pylist():
            diff = [k for k in schema.names if repr(primary_row[k]) != repr(margin_row[k])]
            if best is None or len(diff) < len(best):
                best = diff
        return best or []

    def _record_extra(self, pos, margin) -> np.ndarray:
        """Count and describe extra rows (borderline ones aside); returns the extra ones."""
        if len(pos) == 0:
            return pos
        tiles = margin["tile"][pos]
        own = self.tiles.containing(margin["spidx"][pos] << self.shift_index)
        ratio = self._ratios(margin["ra"][pos], margin["dec"][pos], tiles)
        is_self = own == tiles
        ratio[is_self] = 0.0
        border = ~is_self & (ratio <= 1.0 + self.rtol)
        self._record_borderline(
            [
                {
                    "kind": "extra",
                    "pixel": self._pixel_of(tiles[i]),
                    "spatial_index": int(margin["spidx"][pos[i]]),
                    "distance_ratio": float(ratio[i]),
                }
                for i in np.flatnonzero(border)[: self.max_examples]
            ],
            int(border.sum()),
        )
        real = ~border
        report = self.report
        report.extra += int(real.sum())
        report.self_rows += int(is_self.sum())
        if is_self.any():
            report.structural.append(
                f"{int(is_self.sum())} margin row(s) lie inside the very pixel whose margin holds them "
                f"(e.g. pixel {self._pixel_of(tiles[np.flatnonzero(is_self)[0]])})"
            )
        if real.any():
            report.max_extra_distance_ratio = max(report.max_extra_distance_ratio, float(ratio[real].max()))
            self._extra_ratios.append(ratio[real])
        # farthest first: the most telling examples
        room = self.max_examples - len(report.extra_examples)
        for i in np.flatnonzero(real)[np.argsort(-ratio[real], kind="stable")][: max(room, 0)]:
            report.extra_examples.append(
                {
                    "pixel": self._pixel_of(tiles[i]),
                    "spatial_index": int(margin["spidx"][pos[i]]),
                    "ra": float(margin["ra"][pos[i]]),
                    "dec": float(margin["dec"][pos[i]]),
                    "distance_ratio": float(ratio[i]),
                }
            )
        return pos[real]

    def _record_duplicates(self, pos, margin):
        self.report.duplicates += len(pos)
        room = self.max_examples - len(self.report.duplicate_examples)
        for p in pos[: max(room, 0)]:
            self.report.duplicate_examples.append(
                {
                    "pixel": self._pixel_of(margin["tile"][p]),
                    "row": int(margin["row"][p]),
                    "spatial_index": int(margin["spidx"][p]),
                }
            )

    def _finish_histogram(self):
        ratios = np.concatenate(self._extra_ratios) if self._extra_ratios else np.zeros(0)
        histogram = {}
        for lo, hi in itertools.pairwise(EXTRA_BINS):
            label = f"({lo:g}, {hi:g}]" if math.isfinite(hi) else f"> {lo:g}"
            histogram[label] = int(((ratios > lo) & (ratios <= hi)).sum())
        histogram["self (0)"] = self.report.self_rows
        self.report.extra_histogram = histogram

    def _per_pixel(self, expected, margin, missing_pos, altered_pos, extra_pos):
        n = len(self.tiles)
        counts = {
            "rows": np.bincount(margin["tile"], minlength=n),
            "expected": np.bincount(expected["tile"], minlength=n),
            "missing": np.bincount(expected["tile"][missing_pos], minlength=n),
            "altered": np.bincount(margin["tile"][altered_pos], minlength=n),
            "extra": np.bincount(margin["tile"][extra_pos], minlength=n),
        }
        for tile in np.flatnonzero(sum(counts.values())):
            key = (int(self.tiles.orders[tile]), int(self.tiles.pixels[tile]))
            self.report.per_pixel[key] = {name: int(values[tile]) for name, values in counts.items()}


def _schema_diff(schema: pa.Schema, reference: pa.Schema) -> str:
    ours = {f.name: f.type for f in schema}
    theirs = {f.name: f.type for f in reference}
    parts = []
    for name in reference.names:
        if name not in ours:
            parts.append(f"no column {name!r}")
        elif ours[name] != theirs[name]:
            parts.append(f"{name}: {ours[name]} instead of {theirs[name]}")
    parts += [f"extra column {name!r}" for name in schema.names if name not in theirs]
    if not parts and schema.names != reference.names:
        parts.append("column order differs")
    return "; ".join(parts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Mapping: one task per source partition sends its margin rows to per-destination shards.

Row group by row group (memory bounded by one row group): read the spatial index, find
candidate (row, destination) pairs from the nested bits (geometry.candidate_pairs), in
exact mode read ra/dec of the candidates and keep those within the threshold
(exact_filter), and only then read the full row group to write the selected rows.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from upath import UPath

from hats_margin import geometry
from hats_margin.errors import InputCatalogError
from hats_margin.exact_filter import pairs_within_threshold
from hats_margin.io import (
    ShardWriters,
    TempLayout,
    check_file_schema,
    conform,
    leaf_files,
    leaf_path,
    open_parquet,
    read_json,
    read_row_group,
    write_json,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapTask:
    """Everything one map task needs: one source partition and the destinations it can reach."""

    key: str
    source: tuple[int, int]
    catalog_root: UPath
    input_suffix: str
    dest_orders: np.ndarray
    dest_pixels: np.ndarray
    search_order: int
    rings: int
    threshold_arcsec: float
    fine_filtering: bool
    healpix_column: str
    healpix_order: int
    ra_column: str
    dec_column: str
    schema: pa.Schema
    layout: TempLayout

    @property
    def leaf(self) -> UPath:
        """The partition's file (or directory); built here, not in planning: path joins are
        slow enough to dominate a 50,000-partition plan."""
        return leaf_path(self.catalog_root, *self.source, self.input_suffix)


def map_partition(task) -> dict:
    """Run one map task; returns (and records in its done marker) rows sent per destination."""
    marker = task.layout.map_marker(*task.source)
    done = read_json(marker)
    if done is not None:
        return done
    try:
        rows = _map(task)
    except Exception as exc:
        exc.add_note(f"hats-margin: while mapping partition Norder={task.source[0]}/Npix={task.source[1]} ({task.leaf})")
        raise
    payload = {"source": list(task.source), "rows": {f"{o}_{p}": n for (o, p), n in sorted(rows.items())}}
    write_json(marker, payload)
    return payload


def _map(task) -> dict[tuple[int, int], int]:
    dests = geometry.Tiling.from_pixels(task.dest_orders, task.dest_pixels)
    writers = ShardWriters(task.layout, *task.source, task.schema)
    try:
        for path in leaf_files(task.leaf, task.input_suffix):
            parquet = open_parquet(path)
            check_file_schema(parquet, path, task.schema)
            for group in range(parquet.num_row_groups):
                _map_row_group(task, dests, parquet, path, group, writers)
    finally:
        writers.close()
    return dict(writers.rows)


def _map_row_group(task, dests, parquet, path, group, writers):
    index = read_row_group(parquet, path, group, [task.healpix_column]).column(0)
    if index.null_count:
        raise InputCatalogError(f"{path}: the spatial index column {task.healpix_column!r} has null values")
    spatial_index = index.to_numpy().astype(np.int64, copy=False)
    _check_rows_in_partition(task, path, spatial_index)
    if len(dests) == 0:
        return
    rows, dest_idx = geometry.candidate_pairs(
        spatial_index, task.healpix_order, *task.source, task.search_order, task.rings, dests
    )
    if len(rows) == 0:
        return
    if task.fine_filtering:
        rows, dest_idx = _exact_filter(task, dests, parquet, path, group, spatial_index, rows, dest_idx)
        if len(rows) == 0:
            return
    table = conform(read_row_group(parquet, path, group), task.schema)
    for lo, hi in _runs(dest_idx):
        dest = (int(dests.orders[dest_idx[lo]]), int(dests.pixels[dest_idx[lo]]))
        writers.write(dest, table.take(pa.array(rows[lo:hi])))


def _check_rows_in_partition(task, path, spatial_index):
    order, pixel = task.source
    owner = spatial_index >> (2 * (task.healpix_order - order))
    wrong = np.flatnonzero(owner != pixel)
    if len(wrong):
        raise InputCatalogError(
            f"{path}: {len(wrong)} row(s) have a spatial index outside partition Norder={order}/Npix={pixel} "
            f"(first: {task.healpix_column}={int(spatial_index[wrong[0]])}, which is in order-{order} pixel "
            f"{int(owner[wrong[0]])}); the catalog is mis-partitioned"
        )


def _exact_filter(task, dests, parquet, path, group, spatial_index, rows, dest_idx):
    radec = read_row_group(parquet, path, group, [task.ra_column, task.dec_column])
    keep = pairs_within_threshold(
        radec.column(0).to_numpy(),
        radec.column(1).to_numpy(),
        spatial_index,
        task.healpix_order,
        max(task.search_order, task.source[0]),
        rows,
        dest_idx,
        dests,
        task.threshold_arcsec,
    )
    return rows[keep], dest_idx[keep]


def _runs(sorted_keys: np.ndarray):
    """(lo, hi) bounds of the runs of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return []
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    bounds = np.concatenate([[0], cuts, [len(sorted_keys)]])
    return list(itertools.pairwise(bounds))

"""Planning: check the input, resolve the margin order, and give each map task its own small spec.

Cost is O(partitions): the destination tiling (partitions + negative tree) is built once,
and the destinations each source partition can reach come from one vectorised
neighbour query per partition order. No global pair table is written or read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import hats
import numpy as np
import pyarrow as pa
from hats.catalog import TableProperties
from upath import UPath

from hats_margin import collection, geometry
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import ArgumentError, InputCatalogError
from hats_margin.io import (
    TempLayout,
    as_upath,
    is_local,
    leaf_files,
    leaf_path,
    list_leaves,
    lists_partitions,
    read_input_schema,
)
from hats_margin.resume import digest
from hats_margin.stages.mapping import MapTask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputCatalog:
    """What the pipeline needs to know about the primary catalog."""

    path: UPath
    properties: TableProperties
    schema: pa.Schema
    partitions: tuple[tuple[int, int], ...]
    negative: tuple[tuple[int, int], ...]
    healpix_column: str
    healpix_order: int
    npix_suffix: str

    @property
    def highest_order(self) -> int:
        return max((o for o, _ in self.partitions), default=0)


@dataclass
class Plan:
    args: MarginCacheArguments
    catalog: InputCatalog
    margin_order: int
    threshold_arcsec: float
    layout: TempLayout
    fingerprint: dict
    map_tasks: list[MapTask] = field(default_factory=list)


def make_plan(args: MarginCacheArguments) -> Plan:
    catalog = open_input(args.input_catalog_path)
    check_output_location(args, catalog.path)
    margin_order = resolve_margin_order(args, catalog)
    layout = TempLayout(args.tmp_base)
    plan = Plan(
        args=args,
        catalog=catalog,
        margin_order=margin_order,
        threshold_arcsec=float(args.margin_threshold),
        layout=layout,
        fingerprint=make_fingerprint(args, catalog, margin_order),
    )
    plan.map_tasks = make_map_tasks(plan)
    return plan


# ------------------------------------------------------------------------ input checks
def open_input(path) -> InputCatalog:
    """The primary catalog at ``path`` (for a HATS collection, the collection's primary)."""
    path = as_upath(path)
    listable = lists_partitions(path)  # else (HTTP, object stores) nothing is listed or stat'ed as a directory
    if listable and not path.exists():
        raise InputCatalogError(f"input_catalog_path {path} does not exist")
    if listable and not path.is_dir():
        raise InputCatalogError(
            f"input_catalog_path {path} is not a directory: give the directory of a HATS catalog "
            "(the one holding hats.properties)"
        )
    path = collection.primary_path(path)
    try:
        properties = TableProperties.read_from_dir(path)
    except FileNotFoundError as exc:
        raise InputCatalogError(
            f"input_catalog_path {path} is not a HATS catalog: it has no hats.properties (or properties) file"
            + ("" if listable else " (or it does not exist)")
        ) from exc
    except ValueError as exc:
        raise InputCatalogError(f"the properties file of {path} is invalid: {exc}") from exc
    catalog_type = str(properties.catalog_type)
    if catalog_type not in ("object", "source"):
        raise InputCatalogError(
            f"input_catalog_path {path} is a '{catalog_type}' catalog; only object and source catalogs "
            "take margins (give the primary catalog, not a margin, index, association or map)"
        )
    schema = read_input_schema(path)
    healpix_column = properties.healpix_column or ("_healpix_29" if "_healpix_29" in schema.names else None)
    healpix_order = properties.healpix_order if properties.healpix_order is not None else geometry.MAX_ORDER
    if healpix_column is None or healpix_column not in schema.names:
        raise InputCatalogError(
            f"{path} has no spatial index column ({healpix_column or 'hats_col_healpix not set, no _healpix_29'}"
            " not in its schema): only catalogs with a spatial index column (e.g. _healpix_29) can have a margin"
        )
    for role, column in (("hats_col_ra", properties.ra_column), ("hats_col_dec", properties.dec_column)):
        if not column or column not in schema.names:
            raise InputCatalogError(
                f"{path}: {role}={column!r} does not name a column of the catalog schema; "
                "a margin needs the primary's ra/dec columns"
            )
    try:
        loaded = hats.read_hats(path, read_moc=False)
    except Exception as exc:  # hats raises many types for broken catalogs
        raise InputCatalogError(f"hats cannot open {path}: {type(exc).__name__}: {exc}") from exc
    partitions = tuple((p.order, p.pixel) for p in loaded.get_healpix_pixels())
    neg_orders, neg_pixels = geometry.negative_tree([o for o, _ in partitions], [p for _, p in partitions])
    negative = tuple(zip(neg_orders.tolist(), neg_pixels.tolist()))
    suffix = properties.npix_suffix or ".parquet"
    # local disks: one listing finds every missing partition before any work; elsewhere the
    # partition info is trusted and a missing file fails its map task, naming its path
    missing = sorted(set(partitions) - list_leaves(path)) if listable else []
    if not listable and suffix in ("/", "\\") and partitions:
        leaf_files(leaf_path(path, *partitions[0], suffix), suffix)  # no _metadata and no listing: say so now
    if missing:
        shown = ", ".join(str(leaf_path(path, o, p, suffix)) for o, p in missing[:5])
        raise InputCatalogError(
            f"{len(missing)} partition(s) listed in the catalog's partition info have no file: {shown}"
            + (" ..." if len(missing) > 5 else "")
        )
    return InputCatalog(path, properties, schema, partitions, negative, healpix_column, healpix_order, suffix)


def check_output_location(args: MarginCacheArguments, input_path: UPath):
    output = as_upath(args.output_path)
    if output.exists() and not output.is_dir():
        raise ArgumentError(f"output_path {output} is a file; it must be a directory (or not exist yet)")
    _check_writable_directory("output_path", output)
    if args.catalog_path.exists() and not args.catalog_path.is_dir():
        raise ArgumentError(
            f"the output {args.catalog_path} (output_path/output_artifact_name) is a file; choose another "
            "output_artifact_name"
        )
    for name, inner in (("tmp_dir", args.tmp_base), ("dask_tmp", args.dask_tmp)):
        if getattr(args, name) is None:
            continue
        _check_writable_directory(name, as_upath(getattr(args, name)))
        inner = as_upath(inner)
        if is_local(inner) and is_local(input_path):
            inner_p, input_p = Path(inner.path).resolve(), Path(input_path.path).resolve()
            if inner_p == input_p or inner_p.is_relative_to(input_p):
                raise ArgumentError(
                    f"{name} {getattr(args, name)} is inside the input catalog {input_path}: hats-margin never "
                    f"writes into its input; choose a {name} outside it"
                )
    target = args.catalog_path
    if is_local(target) and is_local(input_path):
        target_p, input_p = Path(target.path).resolve(), Path(input_path.path).resolve()
        if target_p == input_p or target_p.is_relative_to(input_p):
            raise ArgumentError(
                f"the output {target} is inside the input catalog {input_path}; choose an output_path "
                "outside the input"
            )
        if input_p.is_relative_to(target_p):
            raise ArgumentError(
                f"the input catalog {input_path} is inside the output directory {target}; choose another "
                "output_artifact_name or output_path"
            )
    elif str(target).rstrip("/").startswith(str(input_path).rstrip("/") + "/"):
        raise ArgumentError(f"the output {target} is inside the input catalog {input_path}")


def _check_writable_directory(name: str, path: UPath):
    """A local directory we can create files in (or create): its nearest existing ancestor must be
    a writable directory. Checked before any work, as root too (a file in the way, a read-only mount)."""
    if not is_local(path):
        return
    existing = Path(path.path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ArgumentError(f"{name} {path} is not a writable directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(
            f"{name} {path} is not a writable directory: {existing} cannot be written "
            "(permissions or a read-only file system)"
        )


def resolve_margin_order(args: MarginCacheArguments, catalog: InputCatalog) -> int:
    order = int(args.margin_order)
    if order > catalog.healpix_order:
        if args.order_given:
            raise ArgumentError(
                f"margin_order={order} is deeper than the catalog's spatial index "
                f"({catalog.healpix_column} is order {catalog.healpix_order}); use margin_order <= "
                f"{catalog.healpix_order}"
            )
        order = catalog.healpix_order
    if not args.fine_filtering and order <= catalog.highest_order:
        hint = (
            "give a smaller margin_threshold" if not args.order_given else f"use margin_order > {catalog.highest_order}"
        )
        raise ArgumentError(
            f"coarse margins (fine_filtering=False) need margin_order > the catalog's highest partition "
            f"order ({catalog.highest_order}), got margin_order={order}; {hint}, or use fine_filtering=True, "
            "which has no such limit"
        )
    return order


def make_fingerprint(args: MarginCacheArguments, catalog: InputCatalog, margin_order: int) -> dict:
    return {
        "input_catalog_path": str(catalog.path),
        "input_partitions": digest(sorted(catalog.partitions)),
        "input_rows": catalog.properties.total_rows,
        "input_schema": digest(catalog.schema.to_string(show_schema_metadata=False)),
        "output": str(args.catalog_path),
        "margin_threshold": float(args.margin_threshold),
        "margin_order": int(margin_order),
        "fine_filtering": bool(args.fine_filtering),
        "npix_suffix": args.npix_suffix,
        "npix_parquet_name": args.npix_parquet_name,
        "write_table_kwargs": digest(args.write_table_kwargs or {}),
        "create_metadata": bool(args.create_metadata),
        "addl_hats_properties": digest(args.addl_hats_properties or {}),
    }


# ------------------------------------------------------------------------ map tasks
def destinations(catalog: InputCatalog) -> geometry.Tiling:
    pixels = list(catalog.partitions) + list(catalog.negative)
    return geometry.Tiling.from_pixels([o for o, _ in pixels], [p for _, p in pixels])


def reachable_destinations(plan: Plan, tiling: geometry.Tiling) -> dict[tuple[int, int], np.ndarray]:
    """For each source partition, the tiling indices it can send rows to (itself excluded)."""
    result = {}
    by_order: dict[int, list[int]] = {}
    for order, pixel in plan.catalog.partitions:
        by_order.setdefault(order, []).append(pixel)
    for order, pixels in by_order.items():
        rings = geometry.rings_needed(plan.threshold_arcsec, order) if plan.args.fine_filtering else 1
        cells = np.asarray(pixels, dtype=np.int64)
        owner, nbr = geometry.neighbourhood(cells, order, rings)
        nbr_idx, tile_idx = tiling.overlapping(order, nbr)
        pairs = np.unique(np.stack([owner[nbr_idx], tile_idx], axis=1), axis=0)
        bounds = np.searchsorted(pairs[:, 0], np.arange(len(cells) + 1))
        for i, pixel in enumerate(pixels):
            tiles = pairs[bounds[i]:bounds[i + 1], 1]
            tiles = tiles[~((tiling.orders[tiles] == order) & (tiling.pixels[tiles] == pixel))]
            result[(order, pixel)] = tiles
    return result


def make_map_tasks(plan: Plan) -> list[MapTask]:
    catalog, args = plan.catalog, plan.args
    tiling = destinations(catalog)
    reach = reachable_destinations(plan, tiling)
    tasks = []
    # exact mode: the order only sets speed; a margin_order much finer than the threshold would
    # need thousands of neighbour rings, so search no finer than the threshold's own order
    fitting = geometry.one_ring_order(plan.threshold_arcsec)
    for order, pixel in catalog.partitions:
        tiles = reach[(order, pixel)]
        if args.fine_filtering:
            search_order = max(order, min(plan.margin_order, fitting))
            rings = geometry.rings_needed(plan.threshold_arcsec, search_order)
        else:
            search_order, rings = plan.margin_order, 1
        tasks.append(
            MapTask(
                key=f"{order}_{pixel}",
                source=(order, pixel),
                catalog_root=catalog.path,
                input_suffix=catalog.npix_suffix,
                dest_orders=tiling.orders[tiles],
                dest_pixels=tiling.pixels[tiles],
                search_order=search_order,
                rings=rings,
                threshold_arcsec=plan.threshold_arcsec,
                fine_filtering=args.fine_filtering,
                healpix_column=catalog.healpix_column,
                healpix_order=catalog.healpix_order,
                ra_column=catalog.properties.ra_column,
                dec_column=catalog.properties.dec_column,
                schema=catalog.schema,
                layout=plan.layout,
            )
        )
    # biggest first keeps both workers busy until the end
    tasks.sort(key=lambda t: t.source[0])
    return tasks

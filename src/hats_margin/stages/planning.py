"""Planning: check the input, resolve the margin order, give each map task its own small spec,
and (once the map tasks have run) one reduce task per margin pixel from their markers.

Cost is O(partitions): the destination tiling (partitions + negative tree) is built once,
and the destinations each source partition can reach come from one vectorised
neighbour query per partition order. No global pair table is written or read.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from upath import UPath

from hats_margin import collection, geometry
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import ArgumentError, InputCatalogError, describe_invalid
from hats_margin.io import (
    INTERMEDIATE_FORMAT,
    TempLayout,
    as_upath,
    canonical_path,
    leaf_files,
    leaf_path,
    lists_partitions,
    margin_write_kwargs,
    output_file,
    partition_identities,
    read_input_schema,
    scan_leaves,
)
from hats_margin.pixel import Pixel, margin_key, parse_margin_key
from hats_margin.prechecks import check_input_directory, check_output_directories, check_path_relations
from hats_margin.properties import CatalogProperties, catalog_partitions, read_catalog_properties
from hats_margin.resume import digest
from hats_margin.stages.mapping import MapTask
from hats_margin.stages.reducing import ReduceTask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputCatalog:
    """What the pipeline needs to know about the primary catalog."""

    path: UPath
    properties: CatalogProperties
    schema: pa.Schema
    partitions: tuple[tuple[int, int], ...]
    negative: tuple[tuple[int, int], ...]
    healpix_column: str
    healpix_order: int
    npix_suffix: str
    leaf_identities: dict = field(default_factory=dict, compare=False, repr=False)
    """(order, pixel) -> identity of the partition's file(s), from the listing planning makes."""

    @property
    def highest_order(self) -> int:
        """The deepest HEALPix order among the catalog's partitions (0 if it has none)."""
        return max((o for o, _ in self.partitions), default=0)


@dataclass
class Plan:
    """Everything a run decides before any worker starts: the checked input, the margin order
    and threshold (arcsec), where intermediate files go, the resume fingerprint, and one
    :class:`MapTask` per source partition.
    """

    args: MarginCacheArguments
    catalog: InputCatalog
    margin_order: int
    threshold_arcsec: float
    layout: TempLayout
    fingerprint: dict
    map_tasks: list[MapTask] = field(default_factory=list)
    build_path: UPath | None = None
    """Where the catalog is written: the artifact directory, or the staging directory inside it
    when overwrite replaces old contents (set when the output is prepared)."""
    margin_index: int | None = None
    """Several margins from one read: this margin's key in the shared shards (0 = the largest
    threshold, whose plan holds the map tasks and whose layout holds the shards); None alone."""
    shard_layout: TempLayout | None = None
    """Several margins: the layout holding the shared shards and map markers."""

    def __post_init__(self):
        """Build in the artifact directory itself unless told otherwise."""
        if self.build_path is None:
            self.build_path = self.args.catalog_path


def make_plan(args: MarginCacheArguments, catalog: InputCatalog | None = None, run_margins=None,
              with_map_tasks: bool = True) -> Plan:
    """Planning stage of one margin: check the input and output, resolve the margin order and make
    the map tasks (``with_map_tasks``).

    Reads only the input's properties, schema and partition info (no rows). ``catalog``: the
    input, already opened; ``run_margins``: the (name, threshold) of every margin of a
    several-margin run, recorded in the fingerprint. Raises :class:`InputCatalogError` for an
    unusable input and :class:`ArgumentError` for an output or order that cannot work with it.
    """
    if catalog is None:
        catalog = open_input(args.input_catalog_path)
    check_output_location(args, catalog.path)
    margin_order = resolve_margin_order(args, catalog)
    layout = TempLayout(args.tmp_base)
    fingerprint = make_fingerprint(args, catalog, margin_order)
    if run_margins is not None:
        fingerprint["run_margins"] = [list(m) for m in run_margins]
    plan = Plan(
        args=args,
        catalog=catalog,
        margin_order=margin_order,
        threshold_arcsec=float(args.margin_threshold),
        layout=layout,
        fingerprint=fingerprint,
    )
    if with_map_tasks:
        plan.map_tasks = make_map_tasks(plan)
    return plan


def make_plans(args: MarginCacheArguments) -> list[Plan]:
    """Several margins from one read (``args.margins``): one plan per margin, in the given order,
    each with its own output, intermediate directory and fingerprint (which lists every margin of
    the run, so a changed set is refused on resume). The input is opened once. The plan of the
    largest threshold (``margin_index`` 0) holds the only map tasks: their candidate search serves
    that threshold, and each row also goes to every smaller threshold it is within, keyed by the
    margin's index (thresholds in decreasing order); its layout holds the shards of all margins."""
    catalog = open_input(args.input_catalog_path)
    run = [(m.output_artifact_name, float(m.margin_threshold)) for m in args.margins]
    plans = [make_plan(m, catalog, run, with_map_tasks=False) for m in args.margins]
    ranked = sorted(plans, key=lambda p: -p.threshold_arcsec)
    lead = ranked[0]
    for index, plan in enumerate(ranked):
        plan.margin_index, plan.shard_layout = index, lead.layout
    thresholds = tuple(p.threshold_arcsec for p in ranked)
    lead.map_tasks = [dataclasses.replace(t, margin_thresholds=thresholds) for t in make_map_tasks(lead)]
    return plans


# ------------------------------------------------------------------------ input checks
def open_input(path) -> InputCatalog:
    """The primary catalog at ``path`` (for a HATS collection, the collection's primary)."""
    path = as_upath(path)
    listable = lists_partitions(path)  # else (HTTP, object stores) nothing is listed or stat'ed as a directory
    path = check_input_directory(path)
    path = collection.primary_path(path)
    try:
        properties = read_catalog_properties(path)
    except FileNotFoundError as exc:
        raise InputCatalogError(
            f"input_catalog_path {path} is not a HATS catalog: it has no hats.properties (or properties) file"
            + ("" if listable else " (or it does not exist)")
        ) from exc
    except ValueError as exc:
        name = "hats.properties" if (path / "hats.properties").exists() else "properties"
        raise InputCatalogError(f"{path / name} is invalid: {describe_invalid(exc)}; fix that line of the file") from exc
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
    partitions = tuple(catalog_partitions(path))
    neg_orders, neg_pixels = geometry.negative_tree([o for o, _ in partitions], [p for _, p in partitions])
    negative = tuple(zip(neg_orders.tolist(), neg_pixels.tolist()))
    suffix = properties.npix_suffix or ".parquet"
    # one listing where the store can list (local disks, object stores) gives each partition file's
    # identity (size and time or ETag, for resume); on local disks it also finds every missing
    # partition before any work. HTTP cannot list: there the partition info is trusted, a missing
    # file fails its map task naming its path, and identities come from one info call per file.
    present = scan_leaves(path) if path.protocol not in ("http", "https") else {}
    missing = sorted(set(partitions) - present.keys()) if listable else []
    if not listable and suffix in ("/", "\\") and partitions:
        leaf_files(leaf_path(path, *partitions[0], suffix), suffix)  # no _metadata and no listing: say so now
    if missing:
        shown = ", ".join(str(leaf_path(path, o, p, suffix)) for o, p in missing[:5])
        raise InputCatalogError(
            f"{len(missing)} partition(s) listed in the catalog's partition info have no file: {shown}"
            + (" ..." if len(missing) > 5 else "")
        )
    return InputCatalog(
        path, properties, schema, partitions, negative, healpix_column, healpix_order, suffix, present
    )


def check_output_location(args: MarginCacheArguments, input_path: UPath):
    """The output directories are usable and none of them overlaps the (resolved) input."""
    check_output_directories(args)
    check_path_relations(args, input_path)


def resolve_margin_order(args: MarginCacheArguments, catalog: InputCatalog) -> int:
    """The HEALPix order margin pixels are searched at.

    A default order deeper than the catalog's spatial index is lowered to it; a given one raises
    :class:`ArgumentError`. Coarse mode (``fine_filtering=False``) raises unless the order is
    deeper than the catalog's highest partition order.
    """
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
    """The values that decide the margin's contents, as a JSON-able dict.

    A resumed run must have the same fingerprint as the run that left the intermediate files;
    large values (partition list, schema, kwargs) are stored as digests.
    """
    return {
        "input_catalog_path": canonical_path(catalog.path),
        "input_partitions": digest(sorted(catalog.partitions)),
        "input_rows": catalog.properties.total_rows,
        "input_schema": digest(catalog.schema.to_string(show_schema_metadata=False)),
        # each partition's size and time (or ETag): an input edited between a kill and the resume is refused
        "input_files": partition_identities(catalog.path, catalog.partitions, catalog.npix_suffix, catalog.leaf_identities),
        "output": canonical_path(args.catalog_path),
        "margin_threshold": float(args.margin_threshold),
        "margin_order": int(margin_order),
        "fine_filtering": bool(args.fine_filtering),
        "npix_suffix": args.npix_suffix,
        "npix_parquet_name": args.npix_parquet_name,
        "write_table_kwargs": digest(args.write_table_kwargs or {}),
        "create_metadata": bool(args.create_metadata),
        "addl_hats_properties": digest(args.addl_hats_properties or {}),
        "intermediate_format": INTERMEDIATE_FORMAT,
    }


# ------------------------------------------------------------------------ size estimate
def estimate_margin_rows(plan: Plan) -> int:
    """Rough number of rows the margin will hold, from the plan alone (no data read).

    Each partition is given an equal share of the primary's ``hats_nrows`` (hats splits
    partitions by row count) spread uniformly over its area; its margin gets the rows of the
    band around it, estimated by treating the partition as a spherical cap of the same area:
    ``rows x (area of the cap grown by the width - cap area) / cap area``. The width is the
    threshold (exact) or one ``margin_order`` cell (coarse: whole cells are kept). Within a factor
    of ~3 (bundled sample at 10": 10 estimated, 24 written; 200k-row all-sky at 600": 13,947 and
    19,465), which is what the "more rows than the primary" warning needs.
    """
    catalog = plan.catalog
    total = catalog.properties.total_rows or 0
    if not catalog.partitions or total <= 0:
        return 0
    width_arcsec = plan.threshold_arcsec
    if not plan.args.fine_filtering:
        width_arcsec = max(width_arcsec, geometry.coarse_reach_arcsec(plan.margin_order) * 1.6)
    width = np.radians(width_arcsec / 3600.0)
    orders = np.array([o for o, _ in catalog.partitions], dtype=float)
    area = 4 * np.pi / (12 * 4.0**orders)
    radius = np.arccos(1 - area / (2 * np.pi))
    grown = 2 * np.pi * (1 - np.cos(np.minimum(radius + width, np.pi)))
    return round(float(np.sum((grown - area) / area)) * total / len(catalog.partitions))


def warn_on_large_margin(plan: Plan) -> None:
    """UserWarning when the margin is estimated to hold more rows than its primary."""
    total = plan.catalog.properties.total_rows or 0
    estimate = estimate_margin_rows(plan)
    if total and estimate > total:
        warnings.warn(
            f"the margin will hold about {estimate:,} rows, more than the primary's {total:,} "
            f"(threshold {plan.threshold_arcsec:g} arcsec): is the threshold what you meant?",
            UserWarning,
            stacklevel=2,
        )


# ------------------------------------------------------------------------ map tasks
def destinations(catalog: InputCatalog) -> geometry.Tiling:
    """The tiling margin rows can be sent to: every partition plus the negative tree (sky with no partition)."""
    pixels = list(catalog.partitions) + list(catalog.negative)
    return geometry.Tiling.from_pixels([o for o, _ in pixels], [p for _, p in pixels])


def reachable_destinations(plan: Plan, tiling: geometry.Tiling) -> dict[tuple[int, int], np.ndarray]:
    """For each source partition, the tiling indices it can send rows to (itself excluded).

    In exact mode the neighbourhood is searched at an order no finer than the threshold's own
    (ancestors of the partitions, a few rings): a superset of the reachable destinations at any
    threshold for the cost of a small one; a threshold covering the whole sky reaches every tile.
    """
    result = {}
    by_order: dict[int, list[int]] = {}
    for order, pixel in plan.catalog.partitions:
        by_order.setdefault(order, []).append(pixel)
    fine, threshold = plan.args.fine_filtering, plan.threshold_arcsec
    for order, pixels in by_order.items():
        cells = np.asarray(pixels, dtype=np.int64)
        query_order = min(order, geometry.coarse_order_for_threshold(threshold)) if fine else order
        rings = geometry.rings_needed(threshold, query_order) if fine else 1
        if fine and geometry.covers_whole_sky(rings, query_order):
            everything = np.arange(len(tiling), dtype=np.int64)
            for pixel in pixels:
                result[(order, pixel)] = np.delete(everything, tiling.index_of(order, pixel))
            continue
        ancestors, cell_ancestor = np.unique(cells >> (2 * (order - query_order)), return_inverse=True)
        owner, nbr = geometry.neighbourhood(ancestors, query_order, rings)
        nbr_idx, tile_idx = tiling.overlapping(query_order, nbr)
        pairs = np.unique(np.stack([owner[nbr_idx], tile_idx], axis=1), axis=0)
        bounds = np.searchsorted(pairs[:, 0], np.arange(len(ancestors) + 1))
        for i, pixel in enumerate(pixels):
            a = cell_ancestor[i]
            tiles = pairs[bounds[a]:bounds[a + 1], 1]
            tiles = tiles[~((tiling.orders[tiles] == order) & (tiling.pixels[tiles] == pixel))]
            result[(order, pixel)] = tiles
    return result


def make_map_tasks(plan: Plan) -> list[MapTask]:
    """One :class:`MapTask` per source partition, with only the destinations it can reach.

    In exact mode the search order is the partition order at least, and no finer than the
    threshold's own order; coarse mode searches one ring at ``margin_order``. Sorted by partition
    order, shallowest (largest) partitions first.
    """
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
                key=Pixel(order, pixel).key,
                source=Pixel(order, pixel),
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
                check_input=args.check_input,
            )
        )
    # biggest first keeps both workers busy until the end
    tasks.sort(key=lambda t: t.source[0])
    return tasks


def make_reduce_tasks(plan: Plan, map_results: dict[str, dict]) -> list[ReduceTask]:
    """One :class:`ReduceTask` per margin pixel that received rows, from the map tasks' markers
    (several margins: only this plan's rows, read from the shared shards).

    Each task's sources are sorted by spatial-index range, so its file comes out sorted; the
    tasks are returned in spatial-index order of their pixels (neighbours read the same shards:
    ``runner.run_stage`` keeps them in one batch and sends the batches largest first).
    """
    args, catalog = plan.args, plan.catalog
    sources: dict[Pixel, list[tuple[int, int, str, tuple[int, ...], int]]] = {}
    for payload in map_results.values():
        source = tuple(payload["source"])
        shard = payload["shard"]
        batches = payload.get("batches", {})
        for key, n in payload["rows"].items():
            if not n:
                continue
            index, dest = parse_margin_key(key)
            if index == plan.margin_index:  # a destination's batches hold the rows of every margin
                sources.setdefault(dest, []).append((*source, shard, tuple(batches[margin_key(dest)]), n))
    write_kwargs = margin_write_kwargs(catalog.schema, catalog.healpix_column, args.write_table_kwargs)
    tasks = []
    for dest, items in sources.items():
        items.sort(key=lambda s: spatial_order(s[:2]))
        tasks.append(
            ReduceTask(
                key=margin_key(dest, plan.margin_index),
                pixel=dest,
                sources=tuple((o, p, shard, b) for o, p, shard, b, _ in items),
                expected_rows=sum(n for *_, n in items),
                output_file=output_file(plan.build_path, *dest, args.npix_suffix, args.npix_parquet_name),
                schema=catalog.schema,
                healpix_column=catalog.healpix_column,
                write_kwargs=write_kwargs,
                layout=plan.layout,
                shard_layout=plan.shard_layout,
                margin=plan.margin_index,
            )
        )
    tasks.sort(key=lambda t: spatial_order(t.pixel))
    return tasks


def spatial_order(pixel: Pixel) -> int:
    """Where a pixel starts in spatial-index order (its first descendant at the deepest order)."""
    return int(pixel[1]) << (2 * (geometry.MAX_ORDER - int(pixel[0])))

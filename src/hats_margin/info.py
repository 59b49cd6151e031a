"""Plain-text descriptions for the command line: what a catalog is, what a run would do.

Both only read: ``describe_path`` reads properties and the partition list,
``describe_plan`` formats a :class:`~hats_margin.stages.planning.Plan` made by ``make_plan``.
"""

from __future__ import annotations

from collections import Counter

import hats
from hats.catalog import TableProperties

from hats_margin import collection
from hats_margin.errors import InputCatalogError
from hats_margin.io import as_upath, lists_partitions

_WIDTH = 14


def _lines(rows: list[tuple[str, object]]) -> str:
    """``key: value`` lines, the values aligned in one column."""
    return "\n".join(f"{key + ':':<{_WIDTH}} {value}" for key, value in rows)


def _orders(pixels) -> str:
    """Partition count per order, e.g. ``order 0: 1, order 1: 4``."""
    counts = Counter(order for order, _ in pixels)
    return ", ".join(f"order {order}: {n}" for order, n in sorted(counts.items()))


def describe_path(path) -> str:
    """Type, name, rows, partitions, and for margins the threshold and primary, of a catalog or
    collection."""
    path = as_upath(path)
    if lists_partitions(path) and not path.exists():  # stores without listing (HTTP) cannot stat directories
        raise FileNotFoundError(f"{path} does not exist")
    if collection.is_collection(path):
        props = collection.read_properties(path)
        rows = [
            ("path", path),
            ("type", "collection"),
            ("name", props.name),
            ("primary", props.hats_primary_table_url),
            ("margins", " ".join(props.all_margins or []) or "none"),
            ("default margin", props.default_margin or "none"),
            ("indexes", " ".join(f"{k}={v}" for k, v in (props.all_indexes or {}).items()) or "none"),
        ]
        return _lines(rows)
    try:
        props = TableProperties.read_from_dir(path)
    except FileNotFoundError as exc:
        raise InputCatalogError(
            f"{path} is neither a HATS catalog nor a collection (no hats.properties, properties or "
            "collection.properties)" + ("" if lists_partitions(path) else ", or it does not exist")
        ) from exc
    pixels = [(p.order, p.pixel) for p in hats.read_hats(path, read_moc=False).get_healpix_pixels()]
    extra = props.extra_dict(by_alias=True)
    rows = [
        ("path", path),
        ("type", str(props.catalog_type)),
        ("name", props.catalog_name),
        ("rows", props.total_rows),
        ("partitions", f"{len(pixels)} ({_orders(pixels)})" if pixels else "0"),
        ("ra, dec", f"{props.ra_column}, {props.dec_column}"),
    ]
    if str(props.catalog_type) == "margin":
        threshold = f"{props.margin_threshold:g} arcsec"
        if "hats_margin_order" in extra:
            mode = "exact" if str(extra.get("hats_margin_fine_filtering")).lower() == "true" else "coarse"
            threshold += f" ({mode}, margin order {extra['hats_margin_order']})"
        rows += [("threshold", threshold), ("primary", props.primary_catalog)]
    if props.hats_builder:
        rows.append(("built by", props.hats_builder))
    return _lines(rows)


def describe_plan(plan) -> str:
    """What a run with these arguments would read and write (for ``--dry-run``)."""
    args, catalog = plan.args, plan.catalog
    reachable = {
        (int(o), int(p)) for task in plan.map_tasks for o, p in zip(task.dest_orders, task.dest_pixels)
    }
    target = args.catalog_path
    if (target / "hats.properties").exists():
        state = "holds a catalog: refused without --overwrite, unless it is an unfinished run to resume"
    elif target.exists():
        state = "exists (an unfinished run is resumed)"
    else:
        state = "new"
    n_parts, n_negative = len(catalog.partitions), len(catalog.negative)
    destinations = (
        f"{n_parts + n_negative} pixels ({n_parts} partitions + {n_negative} negative tree), "
        f"{len(reachable)} reachable within the threshold"
    )
    from hats_margin.stages.planning import estimate_margin_rows

    mode = "exact" if args.fine_filtering else "coarse"
    margin = f"threshold {plan.threshold_arcsec:g} arcsec, margin order {plan.margin_order}, {mode}"
    total, estimate = catalog.properties.total_rows or 0, estimate_margin_rows(plan)
    estimated = f"~{estimate} (equal rows per partition, uniform within it; a band of the margin width)"
    if total and estimate > total:
        estimated += f"; WARNING: more than the primary's {total} rows"
    rows = [
        ("input", f"{catalog.path} ({catalog.properties.catalog_type} catalog)"),
        ("partitions", f"{len(catalog.partitions)} ({_orders(catalog.partitions)})"),
        ("destinations", destinations),
        ("margin", margin),
        ("rows read", f"{catalog.properties.total_rows} (estimated: the input's hats_nrows)"),
        ("margin rows", estimated),
        ("map tasks", len(plan.map_tasks)),
        ("output", f"{target} ({state})"),
        ("intermediate", plan.layout.base),
    ]
    return "dry run: nothing was written\n" + _lines(rows)

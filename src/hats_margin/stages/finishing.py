"""Finishing: metadata, partition info, then hats.properties last, then clean-up.

Until hats.properties is renamed into place, the output is not a valid catalog. A run
killed after that point but before its intermediate files are removed is completed by
the next run with the same arguments.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin._version import __version__
from hats_margin.io import (
    canonical_path,
    is_local,
    iter_files_size,
    read_footer,
    relative_file,
    write_metadata_files,
)
from hats_margin.properties import MARGIN_KEYS, properties_text, sort_breadth_first, write_partition_info

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from hats_margin.stages.planning import Plan


def finish(plan: Plan, pixel_rows: dict[tuple[int, int], int], footers: dict | None = None) -> dict:
    """Write the catalog-level files; returns a summary.

    ``footers`` maps (order, pixel) to the footer its reduce task returned; only the files of the
    other pixels (published by an earlier run that was resumed) are read back."""
    args, catalog = plan.args, plan.catalog
    target = plan.build_path
    pixels = sort_breadth_first((o, p) for (o, p), n in pixel_rows.items() if n > 0)
    relative = [relative_file(o, p, args.npix_suffix, args.npix_parquet_name) for o, p in pixels]
    known = [(footers or {}).get(pixel) for pixel in pixels]
    unread = [rel for rel, footer in zip(relative, known) if footer is None]
    dataset = target / "dataset"
    with ThreadPoolExecutor(max_workers=16) as pool:
        read = iter(list(pool.map(lambda rel: read_footer(dataset / rel), unread)))
    footers_in_order = [next(read) if footer is None else footer for footer in known]
    written = sum(f.num_rows for f in footers_in_order)
    expected = sum(pixel_rows.values())
    if written != expected:
        raise RuntimeError(f"the margin files hold {written} rows, the map stage sent {expected}")
    write_metadata_files(target, catalog.schema, list(zip(relative, footers_in_order)), args.create_metadata)
    write_partition_info(target, pixels)
    if args.create_plot:
        from hats_margin.plot import plot_margin

        plot_margin(plan, pixel_rows, target / "margin_sky_map.png")
    _write_properties_last(_properties_text(plan, pixels, written), target)
    return {"total_rows": written, "pixels": pixels}


def _properties_text(plan: Plan, pixels, total_rows) -> str:
    """The margin's ``hats.properties``: the primary's columns and index, the threshold, sky
    fraction and size of what was written. Written here in hats' own format; with
    ``addl_hats_properties`` (any key hats knows, in hats' key order) hats writes it."""
    args, catalog = plan.args, plan.catalog
    sky_fraction = round(sum(4.0 ** -o for o, _ in pixels) / 12.0, 5)
    size_kb = int(sum(iter_files_size(plan.build_path / "dataset")) / 1024)
    values = {
        "catalog_name": args.output_artifact_name,
        "catalog_type": "margin",
        "total_rows": int(total_rows),
        "ra_column": catalog.properties.ra_column,
        "dec_column": catalog.properties.dec_column,
        "healpix_column": catalog.healpix_column,
        "healpix_order": int(catalog.healpix_order),
        # absolute (links kept as given), so that it resolves the same from any working directory
        "primary_catalog": canonical_path(catalog.path, resolve_links=False),
        "margin_threshold": float(plan.threshold_arcsec),
        "npix_suffix": args.npix_suffix,
        "moc_sky_fraction": sky_fraction,
        "hats_order": max((o for o, _ in pixels), default=catalog.highest_order),
        "hats_estsize": size_kb,
    }
    extra = {
        "hats_margin_order": int(plan.margin_order),
        "hats_margin_fine_filtering": str(bool(args.fine_filtering)).lower(),
        "hats_builder": f"hats-margin v{__version__}, hats v{version('hats')}",
        "hats_creation_date": datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M%Z"),
        "hats_version": "v1.0",
    }
    if args.addl_hats_properties:
        return _properties_text_by_hats(values, dict(args.addl_hats_properties) | extra)
    return properties_text({key: values[name] for name, key in MARGIN_KEYS} | extra)


def _properties_text_by_hats(values: dict, extra: dict) -> str:
    """The properties text as hats' ``TableProperties`` writes it (validating the extra keys)."""
    from hats.catalog import TableProperties

    with tempfile.TemporaryDirectory(prefix="hats-margin-properties-") as tmp:
        path = UPath(tmp) / "hats.properties"
        TableProperties(**values, **extra).to_properties_file_path(path, initial_comments="HATS catalog")
        return path.read_text(encoding="utf-8")


def _write_properties_tmp(text: str, target) -> UPath:
    """The properties text under a hidden temporary name beside ``hats.properties``."""
    tmp = target / ".hats.properties.tmp"
    tmp.write_text(text, encoding="utf-8")
    return tmp


def _write_properties_last(text: str, target):
    """Write ``hats.properties`` (by rename where local), then its ``properties`` copy.

    Called last: a directory without ``hats.properties`` is not a valid catalog, so a run that
    dies earlier leaves nothing that looks finished.
    """
    tmp = _write_properties_tmp(text, target)
    if is_local(target):
        os.replace(Path(tmp.path), Path((target / "hats.properties").path))
    else:
        (target / "hats.properties").write_text(text, encoding="utf-8")
        tmp.unlink(missing_ok=True)
    (target / "properties").write_text(text, encoding="utf-8")


def clean_up(plan: Plan):
    """Remove what this run wrote in its intermediate directory (the directory too, and its
    tmp_dir/<name> parent, when nothing else is left in them)."""
    base = plan.layout.base
    kept = plan.layout.remove()  # only what a run writes there, at every depth
    if kept:
        logger.warning(
            "kept %d file(s) in %s that hats-margin did not write: %s", len(kept), base, ", ".join(kept[:5])
        )
    parent = base.parent
    if parent != plan.args.catalog_path and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()

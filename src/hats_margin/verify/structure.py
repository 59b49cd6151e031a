"""Checks that need no row comparison: first the link to the primary and the schema (once; a
margin of another catalog stops there with one message), then properties, files, row counts,
partition_info.csv and _metadata."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from hats_margin import io
from hats_margin.verify.catalogs import MarginCatalog, PrimaryCatalog, read_schema, same_columns, schema_diff
from hats_margin.verify.report import VerifyReport
from hats_margin.verify.tiles import Tiles


def primary_mismatch(margin: MarginCatalog, primary: PrimaryCatalog) -> str | None:
    """One message when the margin is not a margin of ``primary`` (it records another primary,
    or its schema is not the primary's), else None. Checked before anything else."""
    problems = []
    url = margin.properties.get("hats_primary_table_url")
    if url:
        recorded = url.rstrip("/").rsplit("/", 1)[-1]
        names = {primary.path.name, primary.catalog_name}
        if recorded not in names:
            problems.append(
                f"it records another primary (hats_primary_table_url={url!r}, but the primary given is "
                f"{primary.catalog_name!r} at {primary.path})"
            )
    schema = read_schema(margin.path)
    if schema is not None and not same_columns(schema, primary.schema):
        problems.append(f"its schema is not the primary's ({schema_diff(schema, primary.schema)})")
    if not problems:
        return None
    return (
        f"{margin.path} is not a margin of {primary.path}: " + "; and ".join(problems)
        + ". Give the margin's own primary (--primary), or none to use hats_primary_table_url; "
        "no rows were compared"
    )


def check_structure(
    margin: MarginCatalog, primary: PrimaryCatalog, tiles: Tiles, threshold: float, report: VerifyReport
) -> dict[int, int]:
    """Structural checks that need no row comparison; returns rows per valid tile file."""
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
    if "hats_margin_threshold" in props and float(props["hats_margin_threshold"]) < threshold * (1 - 1e-12):
        report.warnings.append(
            f"hats_margin_threshold={props['hats_margin_threshold']} is below the checked threshold {threshold:g}"
        )
    common = read_schema(margin.path)
    if common is None:
        report.structural.append("dataset/_common_metadata (and _metadata) missing: the margin has no schema")
    elif not common.equals(primary.schema, check_metadata=True):
        report.warnings.append("dataset/_common_metadata key/value metadata differs from the primary's")
    for relative in margin.bad_dir:
        report.structural.append(f"{relative}: Dir= does not match Npix (hats would not find this file)")
    for relative in margin.stray:
        report.warnings.append(f"dataset/{relative}: not a Norder=/Dir=/Npix= leaf, ignored")
    if not margin.listed:
        report.warnings.append(
            "the margin's store cannot be listed: its files are the ones partition_info.csv names "
            "(stray files and wrong Dir= were not looked for)"
        )

    file_rows: dict[int, int] = {}
    total = 0
    footers: dict[str, int] = {}
    schema_problems: dict[str, list[str]] = {}
    for pixel, files in sorted(margin.files.items()):
        rows = 0
        for file in files:
            location, fs = io.arrow_location(file)
            try:
                parquet = pq.ParquetFile(location, filesystem=fs)
                meta, schema = parquet.metadata, parquet.schema_arrow
            except (OSError, pa.ArrowInvalid) as exc:
                report.structural.append(f"{file}: not a readable parquet file ({exc})")
                continue
            rows += meta.num_rows
            footers[str(file)] = meta.num_rows
            if not same_columns(schema, primary.schema):
                schema_problems.setdefault(schema_diff(schema, primary.schema), []).append(f"{pixel[0]}/{pixel[1]}")
        total += rows
        if rows == 0:
            report.warnings.append(f"pixel {pixel[0]}/{pixel[1]}: empty file(s)")
        if pixel in tiles.index:
            file_rows[tiles.index[pixel]] = rows
        else:
            report.structural.append(
                f"pixel {pixel[0]}/{pixel[1]} ({rows} rows) is neither a partition nor a negative-tree pixel "
                "of the primary"
            )
    for diff, pixels in schema_problems.items():  # one line per distinct difference, not per pixel
        if len(pixels) == 1:
            report.structural.append(f"pixel {pixels[0]}: schema differs from the primary's: {diff}")
            continue
        shown = ", ".join(pixels[:5]) + (f" and {len(pixels) - 5} more" if len(pixels) > 5 else "")
        report.structural.append(f"{len(pixels)} pixel file(s) have a schema that differs from the primary's: {diff} (pixel {shown})")
    report.rows_in_margin = total
    nrows = props.get("hats_nrows")
    if nrows is None:
        report.structural.append("hats_nrows is missing from the properties")
    elif int(nrows) != total:
        report.structural.append(f"hats_nrows={nrows} but the files hold {total} rows")
    _check_partition_info(margin, report)
    _check_metadata_file(margin, footers, report)
    return file_rows


def _check_partition_info(margin: MarginCatalog, report: VerifyReport):
    """partition_info.csv lists each pixel with a file, once, and nothing else."""
    path = margin.path / "partition_info.csv"
    try:
        text = path.read_text()
    except FileNotFoundError:
        report.warnings.append("partition_info.csv is missing")
        return
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    listed = []
    for line in lines[1:]:
        try:
            order, pixel = (int(v) for v in line.split(",")[:2])
        except ValueError:
            report.structural.append(f"partition_info.csv: unreadable line {line!r}")
            continue
        listed.append((order, pixel))
    files = set(margin.files)
    if len(set(listed)) != len(listed):
        report.structural.append("partition_info.csv lists a pixel more than once")
    for pixel in sorted(set(listed) - files):
        report.structural.append(f"partition_info.csv lists {pixel[0]}/{pixel[1]}, which has no file")
    for pixel in sorted(files - set(listed)):
        report.structural.append(f"pixel {pixel[0]}/{pixel[1]} has a file but is not in partition_info.csv")


def _check_metadata_file(margin: MarginCatalog, footers: dict[str, int], report: VerifyReport):
    """If dataset/_metadata exists, its row groups name the data files with their row counts."""
    pointer = margin.path / "dataset" / "_metadata"
    location, fs = io.arrow_location(pointer)
    try:
        meta = pq.read_metadata(location, filesystem=fs)
    except FileNotFoundError:
        return
    except (OSError, pa.ArrowInvalid) as exc:
        report.structural.append(f"dataset/_metadata is unreadable ({exc})")
        return
    listed: dict[str, int] = {}
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        path = group.column(0).file_path if group.num_columns else ""
        listed[path] = listed.get(path, 0) + group.num_rows
    dataset = str(margin.path / "dataset").rstrip("/") + "/"
    actual = {name[len(dataset) :]: n for name, n in footers.items()}
    if listed != actual:
        wrong = sorted(set(listed) ^ set(actual)) or sorted(k for k in listed if listed[k] != actual.get(k))
        report.structural.append(
            f"dataset/_metadata does not describe the files ({meta.num_rows} rows listed, "
            f"{sum(actual.values())} in files; first differences: {wrong[:3]})"
        )

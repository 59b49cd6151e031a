"""The two catalogs a verification reads: the margin (properties, files per pixel) and the
primary (partitions, negative tree, schema, one partition's rows at a time).

Paths, properties, schemas and partition files are read with the package's own I/O helpers
(hats_margin.io); on stores that cannot list (HTTP) the files come from the partition info and
``_metadata``, never from a directory listing.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from hats_margin import io
from hats_margin.errors import InputCatalogError
from hats_margin.properties import catalog_partitions
from hats_margin.verify.tiles import MAX_ORDER, negative_tree

_LEAF = re.compile(r"^Norder=(\d+)/Dir=(\d+)/Npix=(\d+)([^/]*)(?:/([^/]+))?$")


def as_upath(path) -> UPath:
    """A UPath; local paths are made absolute (file listings come back absolute)."""
    upath = io.as_upath(path)
    if io.is_local(upath):
        return UPath(os.path.abspath(upath.path))
    return upath


def read_parquet(path: UPath) -> pa.Table:
    """The whole parquet file at ``path`` as a table."""
    location, fs = io.arrow_location(path)
    return pq.ParquetFile(location, filesystem=fs).read()


def read_properties(catalog: UPath) -> dict[str, str]:
    """The raw key/value pairs of hats.properties (else properties)."""
    for name in ("hats.properties", "properties"):
        try:
            text = (catalog / name).read_text()
        except FileNotFoundError:
            continue
        values = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "!")):
                key, sep, value = line.partition("=")
                if sep:
                    values[key.strip()] = value.strip()
        return values
    raise InputCatalogError(f"{catalog} has no hats.properties (or properties) file: not a HATS catalog")


def read_schema(catalog: UPath) -> pa.Schema | None:
    """The catalog's schema (dataset/_common_metadata, else _metadata), None when it has neither."""
    try:
        return io.read_input_schema(catalog)
    except InputCatalogError:
        return None


def same_columns(schema: pa.Schema, reference: pa.Schema) -> bool:
    """Whether both schemas have the same column names and types, in the same order."""
    return [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in reference]


def schema_diff(schema: pa.Schema, reference: pa.Schema) -> str:
    """How ``schema`` differs from ``reference`` (missing, retyped, extra columns, order), ``; ``-separated."""
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


def conform(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table | None, str | None]:
    """The table with the columns and types of ``schema``, or (None, why not)."""
    absent = [n for n in schema.names if n not in table.column_names]
    if absent:
        return None, f"has no column(s) {absent}"
    table = table.select(schema.names)
    if same_columns(table.schema, schema):
        return table, None
    try:
        return table.cast(schema), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        return None, f"cannot be cast to the primary schema ({exc})"


class MarginCatalog:
    """The margin catalog: its properties and its files per pixel.

    On a local disk the files are found by listing dataset/ (so stray files and wrong ``Dir=``
    are seen); elsewhere they are the ones its partition info names."""

    def __init__(self, path: UPath):
        """Read the margin's properties and find its files per pixel; raises
        :class:`InputCatalogError` if it does not exist or has no properties.
        """
        self.path = path
        if io.lists_partitions(path) and not path.exists():
            raise InputCatalogError(f"margin {path} does not exist")
        self.properties = read_properties(path)
        self.files: dict[tuple[int, int], list[UPath]] = {}
        self.bad_dir: list[str] = []
        self.stray: list[str] = []
        self.listed = io.lists_partitions(path)
        if self.listed:
            self._list_files()
        else:
            self._named_files()

    def _list_files(self):
        """Files per pixel from a listing of dataset/; misplaced (``Dir=``) and stray files are noted."""
        dataset = self.path / "dataset"
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

    def _named_files(self):
        """Files per pixel from the partition info, for stores that cannot list (HTTP)."""
        pixels = catalog_partitions(self.path, "the margin ")
        suffix = self.properties.get("hats_npix_suffix") or ".parquet"
        for order, pixel in pixels:
            leaf = io.leaf_path(self.path, order, pixel, suffix)
            self.files[(order, pixel)] = io.leaf_files(leaf, suffix)

    def threshold_arcsec(self) -> float:
        """The margin's ``hats_margin_threshold`` (arcsec); :class:`InputCatalogError` if absent."""
        value = self.properties.get("hats_margin_threshold")
        if value is None:
            raise InputCatalogError(f"{self.path} has no hats_margin_threshold property: pass threshold_arcsec")
        return float(value)


class PrimaryCatalog:
    """The primary catalog: partitions, negative tree, schema, columns (the catalog files are read
    as the build reads them, by hats-margin's own readers, which tests hold to hats')."""

    def __init__(self, path: UPath):
        """Open the primary (a collection's primary catalog); raises :class:`InputCatalogError` if
        it cannot be read, it is not an object/source catalog, or its ra/dec/index columns are missing.
        """
        from hats_margin import collection
        from hats_margin.properties import read_catalog_properties

        try:
            path = collection.primary_path(path)  # a collection: its primary catalog
            info = read_catalog_properties(path)  # hats reads what is not plain
        except InputCatalogError:
            raise
        except Exception as exc:  # hats raises many types for broken catalogs
            raise InputCatalogError(f"cannot open the primary {path}: {type(exc).__name__}: {exc}") from exc
        self.path = path
        self.catalog_name = info.catalog_name
        if str(info.catalog_type) not in ("object", "source"):
            raise InputCatalogError(
                f"primary {path} is a {info.catalog_type!s} catalog, not an object/source catalog"
            )
        self.partitions = catalog_partitions(path, "the primary ")
        self.negative = negative_tree(self.partitions)
        self.schema = io.read_input_schema(path)
        self.ra_column, self.dec_column = info.ra_column, info.dec_column
        self.healpix_column = info.healpix_column or "_healpix_29"
        self.healpix_order = int(info.healpix_order if info.healpix_order is not None else MAX_ORDER)
        self.npix_suffix = info.npix_suffix or ".parquet"
        for column in (self.ra_column, self.dec_column, self.healpix_column):
            if column not in self.schema.names:
                raise InputCatalogError(f"primary {path}: column {column!r} is not in its schema")

    def read_partition(self, order: int, pixel: int) -> pa.Table:
        """Every row of one partition, cast to the catalog schema; :class:`InputCatalogError` if a file is missing or does not fit."""
        leaf = io.leaf_path(self.path, order, pixel, self.npix_suffix)
        tables = []
        for file in io.leaf_files(leaf, self.npix_suffix):
            try:
                table = read_parquet(file)
            except FileNotFoundError as exc:
                raise InputCatalogError(f"primary partition file {file} does not exist") from exc
            table, why = conform(table, self.schema)
            if table is None:
                raise InputCatalogError(f"primary partition file {file} {why}")
            tables.append(table)
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


def resolve_primary(margin: MarginCatalog, primary_path) -> UPath:
    """The primary given, else the margin's ``hats_primary_table_url`` (absolute, or relative to
    the working directory, the margin's parent directory or the one above)."""
    if primary_path is not None:
        return as_upath(primary_path)
    url = margin.properties.get("hats_primary_table_url")
    if not url:
        raise InputCatalogError(f"{margin.path} has no hats_primary_table_url: pass primary_path")
    candidates = [as_upath(url)]
    if "://" not in url and not url.startswith("/"):  # relative: to the cwd, a collection, its parent
        candidates += [margin.path.parent / url, margin.path.parent.parent / url]
    for candidate in candidates:
        if (candidate / "hats.properties").exists() or (candidate / "properties").exists():
            return candidate
    raise InputCatalogError(
        f"hats_primary_table_url={url!r} of {margin.path} is not a catalog (tried "
        f"{', '.join(str(c) for c in candidates)}): pass primary_path"
    )


"""Every path and byte: input readers, shard and margin writers, the intermediate layout.

Local paths go to pyarrow as plain strings (fast path); other UPaths (s3://, memory://,
...) go through their fsspec filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc
from upath import UPath

from hats_margin.errors import InputCatalogError

logger = logging.getLogger(__name__)

DEFAULT_COMPRESSION_LEVEL = 3
"""zstd level of the margin files. hats defaults to 15, which costs ~5x the write time
for a few percent of size; pass write_table_kwargs={"compression_level": 15} for that."""

_LEAF = re.compile(r"^Npix=(\d+)")
_ORDER = re.compile(r"^Norder=(\d+)$")


def as_upath(path) -> UPath:
    return path if isinstance(path, UPath) else UPath(path)


def is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


def arrow_location(path: UPath):
    """(path string, filesystem) as pyarrow wants them."""
    if is_local(path):
        return str(Path(path.path)), None
    return path.path, path.fs


def dir_number(pixel: int) -> int:
    """The ``Dir=`` of a pixel's leaf: its pixel number rounded down to a multiple of 10,000
    (hats' rule; the one home of it here, the verifier checks it independently)."""
    return (int(pixel) // 10000) * 10000


def pixel_dir(catalog: UPath, order: int, pixel: int) -> UPath:
    return catalog / "dataset" / f"Norder={order}" / f"Dir={dir_number(pixel)}"


def leaf_path(catalog: UPath, order: int, pixel: int, npix_suffix: str) -> UPath:
    """Path of a partition leaf: ``Npix=N<suffix>`` file, or ``Npix=N`` directory when suffix is '/'."""
    suffix = "" if npix_suffix in ("/", "\\") else npix_suffix
    return pixel_dir(catalog, order, pixel) / f"Npix={pixel}{suffix}"


def output_file(catalog: UPath, order: int, pixel: int, npix_suffix: str, npix_parquet_name: str | None) -> UPath:
    leaf = leaf_path(catalog, order, pixel, npix_suffix)
    if npix_suffix in ("/", "\\"):
        return leaf / (npix_parquet_name or f"Npix={pixel}.parquet")
    return leaf


def lists_partitions(path: UPath) -> bool:
    """Whether the partition files of a catalog at ``path`` are found by listing directories.

    Only on local disks: HTTP(S) servers cannot list, and object stores list slowly and at a
    cost. Elsewhere the partitions come from the catalog's partition_info.csv / _metadata
    (as hats reads them) and a listed partition that is missing is reported by its read."""
    return is_local(path)


def leaf_files(leaf: UPath, npix_suffix: str) -> list[UPath]:
    """The parquet files of one partition: the leaf itself, or the files of its directory.

    A directory leaf (``npix_suffix='/'``) is listed on local disks; elsewhere its files are the
    ones ``dataset/_metadata`` names (a store that cannot list has no other way to know them),
    and only without _metadata is the directory listed."""
    if npix_suffix not in ("/", "\\"):
        return [leaf]
    if not lists_partitions(leaf):
        named = _files_named_in_metadata(leaf)
        if named is not None:
            if not named:
                raise InputCatalogError(f"dataset/_metadata names no file in the partition directory {leaf}")
            return named
    try:
        names = sorted(p for p in leaf.iterdir() if not p.name.startswith(("_", ".")) and p.is_file())
    except (OSError, NotImplementedError) as exc:
        if lists_partitions(leaf):
            raise InputCatalogError(f"partition directory {leaf} cannot be read: {exc}") from exc
        raise InputCatalogError(
            f"partition directory {leaf} cannot be listed on this store ({leaf.protocol}://) and the catalog "
            "has no dataset/_metadata naming its files: a catalog with npix_suffix='/' served without "
            "directory listing needs dataset/_metadata (hats writes it)"
        ) from exc
    if not names:
        raise InputCatalogError(f"partition directory {leaf} holds no parquet file")
    return names


_METADATA_FILES: dict[str, dict[str, list[str]] | None] = {}


def _files_named_in_metadata(leaf: UPath) -> list[UPath] | None:
    """The files of a directory leaf that dataset/_metadata names (None: no _metadata).

    The _metadata footer is read once per process and catalog (map tasks of a worker share it)."""
    dataset = leaf.parent.parent.parent
    pointer = dataset / "_metadata"
    key = str(pointer)
    if key not in _METADATA_FILES:
        location, fs = arrow_location(pointer)
        try:
            meta = pq.read_metadata(location, filesystem=fs)
        except FileNotFoundError:
            by_leaf = None
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputCatalogError(f"cannot read {pointer}, which names the partition files: {exc}") from exc
        else:
            by_leaf = {}
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                relative = group.column(0).file_path if group.num_columns else ""
                directory, _, name = relative.rpartition("/")
                if name and name not in by_leaf.get(directory, []):
                    by_leaf.setdefault(directory, []).append(name)
        if len(_METADATA_FILES) > 16:
            _METADATA_FILES.clear()
        _METADATA_FILES[key] = by_leaf
    by_leaf = _METADATA_FILES[key]
    if by_leaf is None:
        return None
    relative = f"{leaf.parent.parent.name}/{leaf.parent.name}/{leaf.name}"
    return [leaf / name for name in sorted(by_leaf.get(relative, []))]


def list_leaves(catalog: UPath) -> set[tuple[int, int]]:
    """(order, pixel) of every ``Norder=K/Dir=D/Npix=N...`` entry under dataset/, in one listing."""
    dataset = catalog / "dataset"
    if not dataset.exists():
        return set()
    found = set()
    root = dataset.fs._strip_protocol(dataset.path).rstrip("/")  # what find() returns (absolute when local)
    for file in dataset.fs.find(dataset.path):
        parts = file[len(root):].lstrip("/").split("/")
        if len(parts) < 3:
            continue
        order, leaf = _ORDER.match(parts[0]), _LEAF.match(parts[2])
        if order and leaf:
            found.add((int(order.group(1)), int(leaf.group(1))))
    return found


def read_input_schema(catalog: UPath) -> pa.Schema:
    """The primary's arrow schema, from dataset/_common_metadata (else _metadata)."""
    for name in ("_common_metadata", "_metadata"):
        pointer = catalog / "dataset" / name
        if pointer.exists():
            location, fs = arrow_location(pointer)
            try:
                return pq.read_schema(location, filesystem=fs)
            except (OSError, pa.ArrowInvalid) as exc:
                raise InputCatalogError(f"cannot read the schema in {pointer}: {exc}") from exc
    raise InputCatalogError(
        f"{catalog} has neither dataset/_common_metadata nor dataset/_metadata: the schema of the "
        "catalog is unknown (re-write the catalog's metadata with hats)"
    )


def open_parquet(path: UPath) -> pq.ParquetFile:
    location, fs = arrow_location(path)
    try:
        return pq.ParquetFile(location, filesystem=fs)
    except FileNotFoundError as exc:
        raise InputCatalogError(f"partition file {path} does not exist") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputCatalogError(f"partition file {path} is not a readable parquet file: {exc}") from exc


def check_file_schema(file: pq.ParquetFile, path: UPath, schema: pa.Schema):
    """Every column of the catalog schema is present with a type that casts safely."""
    file_schema = file.schema_arrow
    for column in schema:
        if column.name not in file_schema.names:
            raise InputCatalogError(
                f"partition file {path} has no column {column.name!r}, which the catalog schema "
                "(_common_metadata) declares: the partitions' schemas differ"
            )
        file_type = file_schema.field(column.name).type
        if file_type != column.type and not _castable(file_type, column.type):
            raise InputCatalogError(
                f"partition file {path}: column {column.name!r} is {file_type}, but the catalog "
                f"schema says {column.type}: the partitions' schemas differ"
            )


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """A cast that keeps the kind of values (numbers stay numbers, text stays text...).

    Casting an empty array says only that arrow has a kernel: string -> double "works" on no
    rows and then fails on the data, far from the file. So the kinds must match as well."""
    if pa.types.is_dictionary(src):
        src = src.value_type
    if pa.types.is_dictionary(dst):
        dst = dst.value_type
    if _kind(src) != _kind(dst) or _kind(src) is None and src != dst:
        return False
    try:
        pa.array([], type=src).cast(dst)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def _kind(kind: pa.DataType) -> str | None:
    t = pa.types
    for name, test in (
        ("number", lambda x: t.is_integer(x) or t.is_floating(x) or t.is_decimal(x)),
        ("text", lambda x: t.is_string(x) or t.is_large_string(x) or t.is_string_view(x)),
        ("binary", lambda x: t.is_binary(x) or t.is_large_binary(x) or t.is_fixed_size_binary(x)),
        ("boolean", t.is_boolean),
        ("time", lambda x: t.is_timestamp(x) or t.is_date(x)),
        ("list", lambda x: t.is_list(x) or t.is_large_list(x) or t.is_fixed_size_list(x)),
    ):
        if test(kind):
            return name
    return None


def read_row_group(file: pq.ParquetFile, path: UPath, index: int, columns=None) -> pa.Table:
    try:
        return file.read_row_group(index, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputCatalogError(f"partition file {path} is corrupt (row group {index}): {exc}") from exc


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in the catalog schema's order and types, with its metadata."""
    table = table.select(schema.names)
    if table.schema.equals(schema, check_metadata=False):
        return table.replace_schema_metadata(schema.metadata)
    return table.cast(schema)


# ---------------------------------------------------------------- intermediate layout
@dataclass(frozen=True)
class TempLayout:
    """Where a run keeps its state; one owner for every intermediate path."""

    base: UPath

    @property
    def run_file(self) -> UPath:
        return self.base / "run.json"

    def map_marker(self, order: int, pixel: int) -> UPath:
        return self.base / "mapping" / f"{order}_{pixel}.json"

    def reduce_marker(self, order: int, pixel: int) -> UPath:
        return self.base / "reducing" / f"{order}_{pixel}.json"

    def shard(self, dest_order: int, dest_pixel: int, src_order: int, src_pixel: int) -> UPath:
        return self.base / "shards" / f"{dest_order}_{dest_pixel}" / f"{src_order}_{src_pixel}.arrow"

    def make_dirs(self):
        for sub in ("mapping", "reducing", "shards"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)


def write_json(path: UPath, payload: dict):
    """Write JSON so that a reader never sees a half file (temp name, then rename when local)."""
    text = json.dumps(payload, sort_keys=True)
    if is_local(path):
        local = Path(path.path)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, local)
    else:
        path.write_text(text)


def read_json(path: UPath) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None


class ShardWriters:
    """One Arrow IPC shard per destination pixel for the rows a source partition sends it."""

    def __init__(self, layout: TempLayout, src_order: int, src_pixel: int, schema: pa.Schema):
        self.layout, self.src, self.schema = layout, (src_order, src_pixel), schema
        self._writers: dict[tuple[int, int], tuple[object, ipc.RecordBatchFileWriter]] = {}
        self.rows: dict[tuple[int, int], int] = {}

    def write(self, dest: tuple[int, int], table: pa.Table):
        if dest not in self._writers:
            path = self.layout.shard(*dest, *self.src)
            location, fs = arrow_location(path)
            try:
                sink = pa.OSFile(location, "wb") if fs is None else fs.open(location, "wb")
            except FileNotFoundError:  # first shard of this destination: make its directory
                path.parent.mkdir(parents=True, exist_ok=True)
                sink = pa.OSFile(location, "wb") if fs is None else fs.open(location, "wb")
            self._writers[dest] = (sink, ipc.new_file(sink, self.schema))
            self.rows[dest] = 0
        self._writers[dest][1].write_table(table)
        self.rows[dest] += table.num_rows

    def close(self):
        for sink, writer in self._writers.values():
            writer.close()
            sink.close()
        self._writers.clear()


def read_shard(path: UPath) -> pa.Table:
    location, fs = arrow_location(path)
    if fs is None:
        with pa.memory_map(location) as source:
            return ipc.open_file(source).read_all()
    with fs.open(location, "rb") as source:
        return ipc.open_file(source).read_all()


def margin_write_kwargs(schema: pa.Schema, spatial_index_column: str, user_kwargs: dict | None) -> dict:
    """Parquet writer options: hats' defaults (encodings, page index, statistics), zstd level 3,
    sorted by the spatial index; ``user_kwargs`` win."""
    defaults = {
        "compression": "zstd",
        "compression_level": DEFAULT_COMPRESSION_LEVEL,
        "sorting_columns": [pq.SortingColumn(schema.get_field_index(spatial_index_column))],
    }
    from hats.io.file_io.file_io import get_parquet_write_table_kwargs  # driver only

    user_kwargs = dict(user_kwargs or {})
    if "compression" in user_kwargs and "compression_level" not in user_kwargs:
        defaults.pop("compression_level")
    return get_parquet_write_table_kwargs(schema, write_table_kwargs=defaults | user_kwargs)


class MarginFileWriter:
    """Streams sorted shards into one margin parquet file, in row groups of row_group_size."""

    def __init__(self, path: UPath, schema: pa.Schema, write_kwargs: dict):
        kwargs = dict(write_kwargs)
        self.row_group_size = int(kwargs.pop("row_group_size", 100_000))
        self.path, self.schema = path, schema
        location, fs = arrow_location(path)
        if fs is None:
            Path(location).parent.mkdir(parents=True, exist_ok=True)
        else:
            fs.makedirs(fs._parent(location), exist_ok=True)
        self._writer = pq.ParquetWriter(location, schema, filesystem=fs, **kwargs)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table):
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_size:
            merged = pa.concat_tables(self._pending)
            self._writer.write_table(merged.slice(0, self.row_group_size), row_group_size=self.row_group_size)
            rest = merged.slice(self.row_group_size)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.rows += table.num_rows

    def close(self):
        if self._pending_rows:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self.row_group_size)
        self._pending = []
        self._writer.close()


def read_footer(path: UPath) -> pq.FileMetaData:
    location, fs = arrow_location(path)
    return pq.read_metadata(location, filesystem=fs)


def write_metadata_files(catalog: UPath, schema: pa.Schema, footers: list[tuple[str, pq.FileMetaData]], create_metadata: bool):
    """dataset/_common_metadata (schema only) and, if asked, dataset/_metadata (every row group,
    file paths relative to dataset/, in the order given)."""
    dataset = catalog / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    location, fs = arrow_location(dataset / "_common_metadata")
    pq.write_metadata(schema, location, filesystem=fs)
    if create_metadata:
        collector = []
        for relative, footer in footers:
            footer.set_file_path(relative)
            collector.append(footer)
        location, fs = arrow_location(dataset / "_metadata")
        pq.write_metadata(schema, location, metadata_collector=collector, filesystem=fs)


def iter_files_size(root: UPath) -> Iterator[int]:
    for info in root.fs.find(root.path, detail=True).values():
        yield int(info.get("size") or 0)


def remove_tree(path: UPath):
    """Delete a directory tree (only ever called on this run's own directories)."""
    if path.exists():
        path.fs.rm(path.path, recursive=True)

"""Every path and byte: input readers, shard and margin writers, the intermediate layout.

Local paths go to pyarrow as plain strings (fast path); other UPaths (s3://, memory://,
...) go through their fsspec filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
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
    """``path`` as a UPath (returned unchanged if it already is one)."""
    return path if isinstance(path, UPath) else UPath(path)


def is_local(path: UPath) -> bool:
    """Whether ``path`` is on the local file system (no protocol, ``file`` or ``local``)."""
    return path.protocol in ("", "file", "local")


# spellings of one protocol: the same store, whatever the URL says
_PROTOCOL_ALIASES = {"s3a": "s3", "gs": "gcs", "file": "", "local": ""}


def canonical_path(path, resolve_links: bool = True) -> str:
    """One spelling per location, for comparing and fingerprinting paths.

    Local paths become absolute and normalised (``..`` and ``.`` removed; symbolic links resolved
    unless ``resolve_links=False``); remote ones become ``protocol://normalised/path`` (``s3a`` is
    ``s3``, no trailing or doubled slashes). Storage options (endpoint, credentials) are not part
    of it."""
    path = as_upath(path)
    if is_local(path):
        local = Path(path.path).expanduser()
        return str(local.resolve() if resolve_links else Path(os.path.abspath(local)))
    protocol = path.protocol[0] if isinstance(path.protocol, (tuple, list)) else path.protocol
    protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
    inner = path.path.split("://", 1)[1] if "://" in path.path else path.path  # HTTP paths keep their scheme
    normalised = posixpath.normpath("/" + inner.strip("/")).lstrip("/")
    return f"{protocol}://{normalised}"


def path_relation(path, other) -> str | None:
    """How ``path`` relates to ``other`` on the same store: ``"same"``, ``"inside"`` (path is below
    other), ``"contains"`` (other is below path), or None (unrelated, or on different stores)."""
    a, b = canonical_path(path), canonical_path(other)
    if a == b:
        return "same"
    if a.startswith(b.rstrip("/") + "/"):
        return "inside"
    if b.startswith(a.rstrip("/") + "/"):
        return "contains"
    return None


def arrow_location(path: UPath):
    """(path string, filesystem) as pyarrow wants them."""
    if is_local(path):
        return str(Path(path.path)), None
    return path.path, path.fs


def dir_number(pixel: int) -> int:
    """The ``Dir=`` of a pixel's leaf: its pixel number rounded down to a multiple of 10,000
    (hats' rule; the one home of it here, the verifier checks it independently)."""
    return (int(pixel) // 10000) * 10000


def leaf_path(catalog: UPath, order: int, pixel: int, npix_suffix: str) -> UPath:
    """Path of a partition leaf: ``Npix=N<suffix>`` file, or ``Npix=N`` directory when suffix is '/'."""
    suffix = "" if npix_suffix in ("/", "\\") else npix_suffix
    return catalog / f"dataset/{_relative_leaf(order, pixel)}{suffix}"  # one join: ~40 us each


def output_file(catalog: UPath, order: int, pixel: int, npix_suffix: str, npix_parquet_name: str | None) -> UPath:
    """The margin parquet file of a pixel: the leaf itself, or for a directory suffix ('/')
    a file inside it named ``npix_parquet_name`` (default ``Npix=N.parquet``).
    """
    return catalog / f"dataset/{relative_file(order, pixel, npix_suffix, npix_parquet_name)}"


def relative_file(order: int, pixel: int, npix_suffix: str, npix_parquet_name: str | None) -> str:
    """``output_file`` below ``dataset/``, '/'-separated, built without path joins (a UPath join
    costs ~40 us: finishing a catalog of 10,000 margin files needs no 40,000 of them)."""
    leaf = _relative_leaf(order, pixel)
    if npix_suffix in ("/", "\\"):
        return f"{leaf}/{npix_parquet_name or f'Npix={pixel}.parquet'}"
    return leaf + npix_suffix


def _relative_leaf(order: int, pixel: int) -> str:
    """``Norder=K/Dir=D/Npix=N`` (no suffix): a leaf below ``dataset/``."""
    return f"Norder={order}/Dir={dir_number(pixel)}/Npix={pixel}"


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
    return set(scan_leaves(catalog))


def scan_leaves(catalog: UPath) -> dict[tuple[int, int], str]:
    """(order, pixel) -> identity of every ``Norder=K/Dir=D/Npix=N...`` leaf under dataset/, from
    one listing (the sizes and times or ETags come with it: no per-file call)."""
    dataset = catalog / "dataset"
    if not dataset.exists():
        return {}
    found: dict[tuple[int, int], list[tuple[str, str]]] = {}
    root = dataset.fs._strip_protocol(dataset.path).rstrip("/")  # what find() returns (absolute when local)
    for file, info in dataset.fs.find(dataset.path, detail=True).items():
        parts = file[len(root):].lstrip("/").split("/")
        if len(parts) < 3:
            continue
        order, leaf = _ORDER.match(parts[0]), _LEAF.match(parts[2])
        if order and leaf:
            found.setdefault((int(order.group(1)), int(leaf.group(1))), []).append(
                ("/".join(parts[3:]), file_identity(info))
            )
    return {key: _leaf_identity(files) for key, files in found.items()}


def file_identity(info: dict) -> str:
    """What identifies one version of a file, from its listing or stat/info entry (no read):
    its size and the store's version tag (ETag on S3 and on HTTP servers that give one), else
    its modification time."""
    tag = None
    for name in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "generation"):
        if info.get(name) is not None:
            tag = info[name]
            break
    return f"{info.get('size')}:{tag}"


def _leaf_identity(files: list[tuple[str, str]]) -> str:
    """One identity for a partition: its file's, or the sorted ``name=identity`` list of a directory leaf's files."""
    if len(files) == 1 and not files[0][0]:
        return files[0][1]
    return ";".join(f"{name}={identity}" for name, identity in sorted(files))


def partition_identities(
    catalog: UPath, partitions, npix_suffix: str, known: dict[tuple[int, int], str] | None = None
) -> dict[str, str]:
    """``"order_pixel"`` -> identity of each partition's file(s): from ``known`` (a listing made
    anyway), else one stat/info call per file (stores that cannot list, e.g. HTTP)."""
    known = known or {}
    result = {}
    for order, pixel in partitions:
        identity = known.get((order, pixel))
        if identity is None:
            leaf = leaf_path(catalog, order, pixel, npix_suffix)
            try:
                if npix_suffix in ("/", "\\"):
                    files = [(p.name, file_identity(p.fs.info(p.path))) for p in leaf_files(leaf, npix_suffix)]
                    identity = _leaf_identity(files)
                else:
                    identity = file_identity(leaf.fs.info(leaf.path))
            except FileNotFoundError:
                identity = "missing"  # its map task's read reports it, naming the path
        result[f"{order}_{pixel}"] = identity
    return result


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
    """Open a partition file's footer; raises :class:`InputCatalogError` if it is missing or not parquet."""
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
    if file_schema.equals(schema, check_metadata=False):
        return  # the usual case, one comparison (a column-by-column walk costs ~2 ms on 110 columns)
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
    """Broad kind of an Arrow type (number, text, binary, boolean, time, list), or None for any other type."""
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


_NUMPY_TYPES = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float32(): np.float32, pa.float64(): np.float64,
}


def numpy_of(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values of a column of fixed-width numbers without nulls as a (read-only) numpy array,
    read from the Arrow data buffer; any other column through pyarrow's ``to_numpy``.

    pyarrow's conversions to and from numpy import pandas the first time a process makes one
    (its pandas shim checks every input): ~0.4 s of every command, for a column of integers."""
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks != 1:
            chunks = [numpy_of(chunk) for chunk in values.chunks]
            return np.concatenate(chunks) if chunks else values.to_numpy()
        values = values.chunk(0)
    dtype = _NUMPY_TYPES.get(values.type)
    if dtype is None or values.null_count:
        return values.to_numpy(zero_copy_only=False)
    if len(values) == 0:
        return np.empty(0, dtype=dtype)
    size = np.dtype(dtype).itemsize
    return np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * size)


def arrow_of(values: np.ndarray) -> pa.Array:
    """A numpy array of fixed-width numbers as an Arrow array sharing its memory (``pa.array``
    would import pandas, see :func:`numpy_of`); any other array through ``pa.array``."""
    values = np.ascontiguousarray(values)
    for arrow_type, dtype in _NUMPY_TYPES.items():
        if values.dtype == dtype and values.ndim == 1:
            return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])
    return pa.array(values)


def read_row_group(file: pq.ParquetFile, path: UPath, index: int, columns=None, use_threads: bool = True) -> pa.Table:
    """Decode one row group (``use_threads=False`` for small ones: thread hand-offs cost more
    than the decoding)."""
    try:
        return file.read_row_group(index, columns=columns, use_threads=use_threads)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputCatalogError(f"partition file {path} is corrupt (row group {index}): {exc}") from exc


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in the catalog schema's order and types, with its metadata."""
    table = table.select(schema.names)
    if table.schema.equals(schema, check_metadata=False):
        return table.replace_schema_metadata(schema.metadata)
    return table.cast(schema)


# ---------------------------------------------------------------- intermediate layout
INTERMEDIATE_FORMAT = 4
"""Version of the shard and marker layout, part of a run's fingerprint: intermediate files of
another layout (3: with several margins, record batches per (margin, destination); 2: one shard
and one marker per map task; 1: one shard per source x destination pair) are never resumed."""

_BATCH = r"\d+_\d+-[0-9a-f]{8}"
"""Name of a batch of map tasks: its first task's ``order_pixel``, then 8 random hex digits (each
attempt at a batch writes files of its own: a batch redone, maybe batched otherwise, never
overwrites a shard that a marker of an earlier attempt names)."""

# every path a run writes below its intermediate directory (relative, '/'-separated); the
# temporary names are io.write_json's
_INTERMEDIATE_ENTRY = re.compile(
    r"run\.json|\.run\.json\.\d+\.tmp"
    r"|reducing(/(\d+_\d+\.json|\.\d+_\d+\.json\.\d+\.tmp))?"  # reduce markers of older runs
    r"|mapping(/(" + _BATCH + r"\.json|\." + _BATCH + r"\.json\.\d+\.tmp"  # format 3 (per batch)
    r"|\d+_\d+\.json|\.\d+_\d+\.json\.\d+\.tmp))?"  # format 2 and 1 (per map task)
    r"|shards(/" + _BATCH + r"\.arrow|/\d+_\d+\.arrow|/\d+_\d+(/\d+_\d+\.arrow)?)?"  # format 3, 2 and 1
)
_BATCH_MARKER = re.compile(_BATCH + r"\.json")


@dataclass(frozen=True)
class TempLayout:
    """Where a run keeps its state; one owner for every intermediate path."""

    base: UPath

    @staticmethod
    def owns(relative: str) -> bool:
        """Is ``relative`` (a path below the intermediate directory) a name this layout writes?"""
        return _INTERMEDIATE_ENTRY.fullmatch(relative) is not None

    def remove(self) -> list[str]:
        """Delete what a run writes here, at every depth, ``run.json`` first (a deletion cut short
        is never resumed from), then the directory if nothing else is left. Anything else (a
        user's file, a symbolic link's target) is kept; returns those kept paths, relative."""
        if not self.base.exists():
            return []
        self.run_file.unlink(missing_ok=True)
        return remove_owned(self.base, self.owns)

    @property
    def run_file(self) -> UPath:
        """``run.json``: the fingerprint of the run that owns this intermediate directory."""
        return self.base / "run.json"

    # the directories are joined once per layout (a UPath join costs ~50 us, a task needs several)
    @cached_property
    def _mapping(self) -> UPath:
        """Directory of the map tasks' done markers."""
        return self.base / "mapping"

    @cached_property
    def _shards(self) -> UPath:
        """Directory of the map tasks' shard files."""
        return self.base / "shards"

    @staticmethod
    def new_batch(first: tuple[int, int]) -> str:
        """A fresh name for one attempt at a batch of map tasks whose first task maps ``first``."""
        return f"{first[0]}_{first[1]}-{uuid.uuid4().hex[:8]}"

    def map_marker(self, batch: str) -> UPath:
        """The done marker of a batch of map tasks (written once its shard is complete)."""
        return self._mapping / f"{batch}.json"

    def shard(self, batch: str) -> UPath:
        """The one shard file of a batch of map tasks: every task's rows, in record batches per
        (source, destination)."""
        return self._shards / f"{batch}.arrow"

    def map_markers(self) -> list[UPath]:
        """The done markers of the batches of map tasks written so far (sorted by name)."""
        if not self._mapping.exists():
            return []
        return sorted((p for p in self._mapping.iterdir() if _BATCH_MARKER.fullmatch(p.name)), key=lambda p: p.name)

    def make_dirs(self):
        """Create the mapping and shards directories (and the base) if missing."""
        # no "reducing": a reduce task's published margin file is its done marker (reducing/ is
        # still owned, for the markers of runs made before that)
        for sub in ("mapping", "shards"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)


def remove_owned(base: UPath, owns) -> list[str]:
    """Delete the files below ``base`` whose relative path ``owns`` accepts, at every depth, then
    the directories left empty that it accepts (and ``base`` itself when nothing is left). Returns
    the kept paths, relative: a user's file is never deleted."""
    if not base.exists():
        return []
    if is_local(base):
        return _remove_local(Path(base.path), owns)
    fs = base.fs
    root = fs._strip_protocol(base.path).rstrip("/")
    found = fs.find(root, withdirs=True, detail=True)
    ours, kept = [], []
    for path, info in found.items():
        relative = path[len(root):].strip("/")
        if not relative or info.get("type") == "directory":
            continue
        if owns(relative):
            ours.append(path)
        else:
            kept.append(relative)
    if ours:
        fs.rm(ours)
    if not kept and fs.exists(root):
        fs.rm(root, recursive=True)  # directory markers some stores keep
    return sorted(kept)


def _remove_local(root: Path, owns) -> list[str]:
    """remove_owned on a local disk: os.walk never follows a symbolic link. Relative names are
    sliced from the walked paths (os.path.relpath costs as much as the unlink)."""
    kept = []
    top = os.path.join(str(root), "")
    for folder, dirs, files in os.walk(top, topdown=False):
        inner = folder[len(top):].replace(os.sep, "/")
        prefix = inner + "/" if inner else ""
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            relative = prefix + name
            if owns(relative):
                os.unlink(os.path.join(folder, name))
            else:
                kept.append(relative)
        relative = inner or "."
        if relative == "." or owns(relative):
            try:
                os.rmdir(folder)
            except OSError:  # holds something that is not ours
                pass
    return sorted(kept)


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
    """The JSON object in ``path``, or None if the file is missing or not valid JSON (a marker cut short)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None


MARGINS_COLUMN = "__hats_margin_margins__"
"""Several margins from one read: the shards' last column, per row the margins it belongs to (bit
k: margin k, thresholds largest first). A row in several margins is written once, in one record
batch per destination, and each margin's reduce keeps its own rows (in their order)."""


def shard_schema(schema: pa.Schema, margins: int) -> pa.Schema:
    """The schema of the shards: the catalog's, and with several margins :data:`MARGINS_COLUMN` last
    (the smallest unsigned integer with a bit per margin; at most 64 margins)."""
    if margins <= 1:
        return schema
    return schema.append(pa.field(MARGINS_COLUMN, margin_bits_type(margins), nullable=False))


def margin_bits_type(margins: int) -> pa.DataType:
    """The unsigned integer type with a bit for each of ``margins`` margins."""
    for bits, kind in ((8, pa.uint8()), (16, pa.uint16()), (32, pa.uint32()), (64, pa.uint64())):
        if margins <= bits:
            return kind
    raise ValueError(f"{margins} margins from one read: at most 64")


def rows_of_margin(table: pa.Table, margin: int) -> pa.Table:
    """The rows of a shard's ``table`` (with :data:`MARGINS_COLUMN` last) that belong to margin
    ``margin``, in their order, without that column: the catalog schema's rows."""
    last = table.num_columns - 1
    bits = numpy_of(table.column(last))
    keep = (bits >> bits.dtype.type(margin)) & bits.dtype.type(1)
    rows = table.remove_column(last)
    return rows if keep.all() else rows.take(arrow_of(np.flatnonzero(keep)))


SHARD_FLUSH_BYTES = 4 << 20
"""Rows a map task holds in memory before writing them to its batch's shard: small beside a row
group (the memory bound), large enough that a destination's rows from many row groups share a
record batch."""


class ShardWriters:
    """The single Arrow IPC shard of one batch of map tasks, whatever the number of tasks and
    destinations: O(batches) intermediate files, never O(map tasks) or O(source x destination).

    Keys are ``(source order, source pixel, destination order, destination pixel)`` (with several
    margins from one read, a row's margins are a column of its own: :data:`MARGINS_COLUMN`). Rows are
    buffered per key and written, key after key, as record batches; ``index[source][destination]``
    says which batches hold them (recorded in the batch's done marker), so a reduce task reads
    only its own batches (random access in the IPC file format). The buffer is flushed whenever it
    holds ``flush_bytes`` and when the batch ends (``close``), so memory stays bounded by one row
    group plus ``flush_bytes``; a record batch never mixes two sources (they are other keys).
    """

    def __init__(self, path: UPath, schema: pa.Schema, flush_bytes: int | None = None):
        """Nothing is opened until the first flush (a batch sending no row writes no file);
        ``flush_bytes`` is the buffer size (bytes) that triggers one (default
        ``SHARD_FLUSH_BYTES``)."""
        self.path = path
        self.schema = schema
        self.flush_bytes = SHARD_FLUSH_BYTES if flush_bytes is None else flush_bytes
        self._sink = self._writer = None
        self._pending: dict[tuple[int, ...], list[pa.Table]] = {}
        self._pending_sizes: dict[tuple[int, ...], int] = {}
        self._pending_bytes = 0
        self._batches = 0
        self.broken = False
        """a write into the file failed: what it holds is unknown, nothing of it may be published"""
        self.rows: dict[tuple[int, int], dict[tuple[int, ...], int]] = {}
        self.index: dict[tuple[int, int], dict[tuple[int, ...], list[int]]] = {}

    def source(self, source: tuple[int, int]) -> SourceShard:
        """The writer one map task sends its rows to (keys without the source)."""
        return SourceShard(self, (int(source[0]), int(source[1])))

    def write(self, key: tuple[int, ...], table: pa.Table, nbytes: int | None = None):
        """Send ``table`` (rows of the shard's schema) to ``key``: (source order, source pixel,
        *destination). ``nbytes``: its size if the caller knows it (``table.nbytes`` walks every
        column: ~0.3 ms on 110 columns, more than the rest of a write); else the size of the
        buffers it uses, an upper bound (a slice counts its parent's)."""
        if not table.num_rows:
            return
        size = table.get_total_buffer_size() if nbytes is None else int(nbytes)
        self._pending.setdefault(key, []).append(table)
        self._pending_sizes[key] = self._pending_sizes.get(key, 0) + size
        self._pending_bytes += size
        rows = self.rows.setdefault(key[:2], {})
        rows[key[2:]] = rows.get(key[2:], 0) + table.num_rows
        if self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self):
        """Write the buffered rows: one record batch per key."""
        if self._pending:
            try:
                self._write_pending()
            except BaseException:
                self.broken = True
                raise

    def _write_pending(self):
        """Write the buffered rows, key by key, as record batches, noting their batch numbers."""
        if self._writer is None:
            location, fs = arrow_location(self.path)
            self._sink = pa.OSFile(location, "wb") if fs is None else fs.open(location, "wb")
            self._writer = ipc.new_file(self._sink, self.schema)
        for key in sorted(self._pending):
            tables = self._pending[key]
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            index = self.index.setdefault(key[:2], {}).setdefault(key[2:], [])
            for batch in table.combine_chunks().to_batches():
                self._writer.write_batch(batch)
                index.append(self._batches)
                self._batches += 1
        self._pending.clear()
        self._pending_sizes.clear()
        self._pending_bytes = 0

    def drop(self, source: tuple[int, int]):
        """Forget a failed map task's rows: its buffered rows are discarded; record batches it
        already wrote stay in the file, named by no marker."""
        for key in [k for k in self._pending if k[:2] == source]:
            del self._pending[key]
            self._pending_bytes -= self._pending_sizes.pop(key)
        self.rows.pop(source, None)
        self.index.pop(source, None)

    def close(self):
        """Flush and complete the file (its footer makes the batches readable)."""
        self.flush()
        try:
            self.abort()
        except BaseException:
            self.broken = True
            raise

    def abort(self):
        """Release the file without flushing (after a failure; the marker is never written)."""
        self._pending.clear()
        if self._writer is not None:
            writer, sink = self._writer, self._sink
            self._writer = self._sink = None
            try:
                writer.close()
            finally:
                sink.close()


@dataclass
class SourceShard:
    """One map task's view of its batch's shard: rows sent per destination, and the record
    batches holding them."""

    shard: ShardWriters
    source: tuple[int, int]
    margin_rows: dict[tuple[int, ...], int] = field(default_factory=dict)
    """Several margins from one read: rows per (margin, order, pixel) (a row is sent once, to the
    destination, with the margins it is in: see :data:`MARGINS_COLUMN`)."""

    def write(self, dest: tuple[int, ...], table: pa.Table, nbytes: int | None = None):
        """Send ``table`` to destination ``dest`` (``(order, pixel)``); ``nbytes``: its size, if
        known (see :meth:`ShardWriters.write`)."""
        self.shard.write((*self.source, *dest), table, nbytes)

    @property
    def rows(self) -> dict[tuple[int, ...], int]:
        """Rows sent per destination."""
        return self.shard.rows.get(self.source, {})

    @property
    def index(self) -> dict[tuple[int, ...], list[int]]:
        """Record batches of the shard per destination (complete once the task's rows are flushed)."""
        return self.shard.index.get(self.source, {})


def read_shard(path: UPath, batches) -> pa.Table:
    """The given record batches of a batch's shard, as one table (reads only those batches)."""
    source, reader = _open_shard(path)
    try:
        return _batches_of(reader, batches)
    finally:
        source.close()


def _open_shard(path: UPath):
    """(file, IPC reader) of the shard at ``path`` (read, not memory-mapped)."""
    location, fs = arrow_location(path)
    source = pa.OSFile(location, "rb") if fs is None else fs.open(location, "rb")
    try:
        return source, ipc.open_file(source)
    except BaseException:
        source.close()
        raise


def _batches_of(reader: ipc.RecordBatchFileReader, batches) -> pa.Table:
    """The record batches ``batches`` of an open shard, as one table."""
    return pa.Table.from_batches([reader.get_batch(i) for i in batches], schema=reader.schema)


class ShardReaders:
    """The shards one batch of reduce tasks reads, each opened once while the batch runs.

    Opening a shard parses its footer, which lists every record batch of its batch of map tasks
    (hundreds): that cost as much as reading a small margin's rows, and the reduce tasks of one
    batch (neighbouring pixels, or the margins of one pixel) read the same few shards again and
    again. Shards are read, not memory-mapped, so memory holds only the record batches in use; at
    most ``limit`` stay open (least recently used closed first), and ``close`` releases them all.
    """

    def __init__(self, limit: int = 64):
        """Nothing opened yet; ``limit``: most shards kept open at once."""
        self.limit = limit
        self._open: dict[tuple[str, str], tuple[object, ipc.RecordBatchFileReader]] = {}
        self.batches_read = 0
        """record batches read so far"""

    def read(self, layout: TempLayout, batch: str, batches) -> pa.Table:
        """The record batches ``batches`` of the shard of ``batch`` (in ``layout``), as one table."""
        key = (str(layout.base), batch)
        if key in self._open:
            self._open[key] = self._open.pop(key)  # most recently used last
        else:
            while len(self._open) >= self.limit:  # close the least recently used
                self._open.pop(next(iter(self._open)))[0].close()
            self._open[key] = _open_shard(layout.shard(batch))
        self.batches_read += len(batches)
        return _batches_of(self._open[key][1], batches)

    def close(self):
        """Close every shard still open."""
        while self._open:
            self._open.popitem()[1][0].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def margin_write_kwargs(schema: pa.Schema, spatial_index_column: str, user_kwargs: dict | None) -> dict:
    """Parquet writer options: hats' defaults (encodings, page index, statistics), zstd level 3,
    sorted by the spatial index; ``user_kwargs`` win."""
    defaults = {
        "compression": "zstd",
        "compression_level": DEFAULT_COMPRESSION_LEVEL,
        "sorting_columns": [pq.SortingColumn(schema.get_field_index(spatial_index_column))],
    }
    user_kwargs = dict(user_kwargs or {})
    if "compression" in user_kwargs and "compression_level" not in user_kwargs:
        defaults.pop("compression_level")
    return hats_write_kwargs(schema, defaults | user_kwargs)


def leaf_columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    """(parquet dotted path, type) of every leaf column, as parquet names nested columns."""
    leaves = []

    def walk(dtype: pa.DataType, path: str):
        """Visit ``dtype`` and its children (struct fields, list values, extension storage)."""
        if isinstance(dtype, pa.BaseExtensionType):
            walk(dtype.storage_type, path)
        elif pa.types.is_struct(dtype):
            for child in dtype:
                walk(child.type, f"{path}.{child.name}")
        elif pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
            walk(dtype.value_type, f"{path}.list.element")
        elif pa.types.is_map(dtype):
            walk(dtype.key_type, f"{path}.key_value.key")
            walk(dtype.item_type, f"{path}.key_value.value")
        else:
            leaves.append((path, dtype))

    for column in schema:
        walk(column.type, column.name)
    return leaves


def hats_write_kwargs(schema: pa.Schema, kwargs: dict) -> dict:
    """The writer options hats' ``get_parquet_write_table_kwargs`` gives (without importing hats,
    ~1 s): byte-stream-split for floats, delta encoding for ``_healpix_29`` and an integer leading
    sort column, dictionary encoding for the rest, 128 kB pages, statistics and page index;
    ``kwargs`` win (``use_dictionary`` / ``column_encoding`` adjust those defaults)."""
    kwargs = dict(kwargs)
    leaves = leaf_columns(schema)
    use_dictionary = kwargs.pop("use_dictionary", True)
    encoding = {path: "BYTE_STREAM_SPLIT" for path, dtype in leaves if pa.types.is_floating(dtype)}
    if any(path == "_healpix_29" for path, _ in leaves):
        encoding["_healpix_29"] = "DELTA_BINARY_PACKED"
    if kwargs.get("sorting_columns"):
        path, dtype = leaves[kwargs["sorting_columns"][0].column_index]
        if pa.types.is_integer(dtype):
            encoding[path] = "DELTA_BINARY_PACKED"
    encoding.update(kwargs.pop("column_encoding", None) or {})
    if use_dictionary is True:
        dictionary = [path for path, _ in leaves if path not in encoding]
    else:
        dictionary = use_dictionary
        for path in dictionary if isinstance(dictionary, list) else []:
            encoding.pop(path, None)
    page_size = kwargs.get("data_page_size", 128 * 1024)
    options = {
        "row_group_size": 100_000, "compression": "zstd", "compression_level": 15, "column_encoding": encoding,
        "use_dictionary": dictionary, "data_page_size": page_size, "dictionary_pagesize_limit": page_size,
        "write_statistics": True, "write_page_index": True,
    }
    if "compression" in kwargs:
        options["compression_level"] = None
    return options | kwargs


SMALL_FILE_BYTES = 8 << 20
"""Rows (Arrow bytes) a margin file holds in memory before it is opened: a smaller file is encoded
in memory and written in one call (most margin files are small: creating the file and writing it
page by page cost more than encoding it)."""


class MarginFileWriter:
    """Streams sorted shards into one margin parquet file, in row groups of row_group_size.

    A file of fewer rows than a row group and fewer than ``SMALL_FILE_BYTES`` is encoded in memory
    at ``close`` and written in one call; a larger one is opened as soon as it outgrows that and
    written row group by row group. The bytes are the same either way."""

    def __init__(self, path: UPath, schema: pa.Schema, write_kwargs: dict):
        """A writer for ``path`` (its directory is created when the file is written);
        ``write_kwargs`` go to :class:`pyarrow.parquet.ParquetWriter`, except ``row_group_size``
        (rows, default 100,000)."""
        kwargs = dict(write_kwargs)
        self.row_group_size = int(kwargs.pop("row_group_size", 100_000))
        self.path, self.schema, self._kwargs = path, schema, kwargs
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0
        self.rows = 0
        self.metadata: pq.FileMetaData | None = None
        """The file's footer, once closed (what ``read_footer`` would read back)."""

    def write(self, table: pa.Table):
        """Append ``table``'s rows, writing every full row group; ``rows`` counts all rows given."""
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.get_total_buffer_size()  # a bound on nbytes, 30x cheaper
        self.rows += table.num_rows
        if self._writer is None:
            if self._pending_rows < self.row_group_size and self._pending_bytes < SMALL_FILE_BYTES:
                return
            self._writer = self._open(*arrow_location(self.path))
        while self._pending_rows >= self.row_group_size:
            merged = pa.concat_tables(self._pending)
            self._writer.write_table(merged.slice(0, self.row_group_size), row_group_size=self.row_group_size)
            rest = merged.slice(self.row_group_size)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    @property
    def streaming(self) -> bool:
        """Whether the file is open and written row group by row group (else it is still in memory)."""
        return self._writer is not None

    def _open(self, location: str, fs) -> pq.ParquetWriter:
        """The parquet writer of the file at ``location`` (on ``fs``; None: local), its directory created."""
        _make_parent(location, fs)
        return pq.ParquetWriter(location, self.schema, filesystem=fs, **self._kwargs)

    def close(self):
        """Write the last, partial row group (a small file: all of it, in one write) and close the file."""
        writer = self._writer
        if writer is None:
            sink = pa.BufferOutputStream()
            writer = pq.ParquetWriter(sink, self.schema, **self._kwargs)
        if self._pending_rows:
            writer.write_table(pa.concat_tables(self._pending), row_group_size=self.row_group_size)
        self._pending = []
        writer.close()
        self.metadata = writer.writer.metadata
        if self._writer is None:
            location, fs = arrow_location(self.path)
            _make_parent(location, fs)
            with open(location, "wb") if fs is None else fs.open(location, "wb") as handle:
                handle.write(sink.getvalue())


def _make_parent(location: str, fs):
    """Create the directory of ``location`` (on ``fs``; None: local) if missing."""
    if fs is None:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    else:
        fs.makedirs(fs._parent(location), exist_ok=True)


def temporary_sibling(path: UPath) -> UPath:
    """Where a file is written before it is published: a hidden name in the same directory (same
    file system, so the rename is atomic; readers of the catalog skip names starting with '.')."""
    return path.with_name(f".{path.name}.tmp")


def publish(temporary: UPath, final: UPath):
    """Move a completely written file to its final name: an atomic rename on local disks; on object
    stores a copy then a delete (the final object appears whole or not at all)."""
    if is_local(final):
        os.replace(Path(temporary.path), Path(final.path))
    else:
        final.fs.mv(temporary.path, final.path)


def remove_file(path: UPath):
    """Delete one file if it exists (a temporary file of a write that failed)."""
    try:
        path.fs.rm_file(path.path)
    except FileNotFoundError:
        pass


def read_footer(path: UPath) -> pq.FileMetaData:
    """The parquet footer (metadata) of the file at ``path``."""
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


def listed_files(root: UPath) -> set[str]:
    """Every file below ``root``, in one listing, as ``file_key`` spells them (empty if no root)."""
    if is_local(root):
        top = Path(root.path)
        return {os.path.join(folder, name) for folder, _, names in os.walk(top) for name in names}
    if not root.exists():
        return set()
    fs = root.fs
    return {fs._strip_protocol(p).rstrip("/") for p in fs.find(root.path)}


def file_key(path: UPath) -> str:
    """A file's path as ``listed_files`` spells it (local: the plain path; else the store's key)."""
    if is_local(path):
        return str(Path(path.path))
    return path.fs._strip_protocol(path.path).rstrip("/")


def iter_files_size(root: UPath) -> Iterator[int]:
    """Size in bytes of each file under ``root``, at any depth."""
    for info in root.fs.find(root.path, detail=True).values():
        yield int(info.get("size") or 0)


def remove_tree(path: UPath):
    """Delete a directory tree (only ever called on this run's own directories)."""
    if path.exists():
        path.fs.rm(path.path, recursive=True)

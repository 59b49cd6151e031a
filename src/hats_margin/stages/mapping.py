"""Mapping: one task per source partition writes its margin rows, grouped by destination, to the
one shard of its batch.

Row group by row group (memory bounded by one row group): read the spatial index (and ra/dec in
exact mode), find candidate (row, destination) pairs from the nested bits
(geometry.candidate_pairs), in exact mode keep those within the threshold (exact_filter), and
only then decode the other columns to send the selected rows to the shard (io.ShardWriters).
Small row groups (decoded whole in one read) wait, up to ``DEFER_BYTES``, to have their
candidates tested together with the next ones, of any task of the batch (``_Deferred``): one call
of the exact test costs a fixed ~0.5 ms, as much as its work on a small partition.
The tasks of one Dask batch (runner.run_stage) share one shard and one done marker
(``map_batch``): intermediate files are O(batches), not O(map tasks). The marker records, per
task, the rows and the shard's record batches per destination, for the reduce tasks and resume.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from upath import UPath

from hats_margin import geometry
from hats_margin.checks import check_coordinates
from hats_margin.errors import InputCatalogError
from hats_margin.exact_filter import CandidatePairs, pairs_within_thresholds_of_parts
from hats_margin.io import (
    INTERMEDIATE_FORMAT,
    MARGINS_COLUMN,
    ShardWriters,
    SourceShard,
    TempLayout,
    arrow_of,
    check_file_schema,
    conform,
    leaf_files,
    leaf_path,
    margin_bits_type,
    numpy_of,
    open_parquet,
    read_row_group,
    shard_schema,
    write_json,
)
from hats_margin.pixel import Pixel, margin_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapTask:
    """Everything one map task needs: one source partition and the destinations it can reach."""

    key: str
    source: Pixel
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
    check_input: bool = False
    """check every row's ra/dec against its spatial index (else only the rows read anyway)"""
    margin_thresholds: tuple[float, ...] = ()
    """Several margins from this one read: their thresholds, largest first (the first is
    ``threshold_arcsec``, which the candidate search serves). A row then goes to each destination
    once, with the margins it is in (``io.MARGINS_COLUMN``); empty for a single margin."""

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The thresholds the exact test decides (largest first)."""
        return self.margin_thresholds or (self.threshold_arcsec,)

    @property
    def leaf(self) -> UPath:
        """The partition's file (or directory); built here, not in planning: path joins are
        slow enough to dominate a 50,000-partition plan."""
        return leaf_path(self.catalog_root, *self.source, self.input_suffix)


def map_batch(tasks: list[MapTask]) -> dict[str, tuple[bool, object]]:
    """Run a batch of map tasks (one Dask task) into one shard, then one done marker for them all.

    Returns ``{task.key: (True, payload)}`` or ``{task.key: (False, exception)}`` per task, as
    ``runner.run_stage`` expects of a batch function. A task that raises is reported alone (its
    exception names its partition): its buffered rows are dropped, the other tasks go on, and the
    marker lists only the tasks that succeeded. If the shard itself cannot be written (a failed
    flush, footer or marker), no marker is written and every task of the batch fails with that
    error. A batch killed midway leaves no marker: all its tasks are redone (in a new shard)."""
    if not tasks:
        return {}
    layout = tasks[0].layout
    batch = layout.new_batch(tasks[0].source)
    shard = ShardWriters(layout.shard(batch), shard_schema(tasks[0].schema, len(tasks[0].margin_thresholds)))
    outcome: dict[str, tuple[bool, object]] = {}
    mapped: dict[str, _Mapped] = {}
    deferred = _Deferred()

    def fail(task: MapTask, exc: Exception):
        """One task failed: its buffered and deferred rows go, the other tasks go on (unless the
        shard itself could not be written: then no task of the batch is done)."""
        outcome[task.key] = (False, exc)
        mapped.pop(task.key, None)
        deferred.drop(task.key)
        if shard.broken:
            raise exc
        shard.drop(task.source)

    def settle():
        """Run the exact test of the deferred row groups and send their rows."""
        for task, exc in deferred.resolve():
            fail(task, exc)

    try:
        for task in tasks:
            try:
                mapped[task.key] = map_partition(task, shard, batch, deferred)
            except Exception as exc:  # noqa: BLE001 - this task fails alone (see fail)
                fail(task, exc)
            if deferred.full:
                settle()
        settle()
        shard.close()
        payloads = {key: result.payload() for key, result in mapped.items()}
        if payloads:
            write_json(layout.map_marker(batch), {
                "format": INTERMEDIATE_FORMAT, "shard": batch, "tasks": payloads,  # read by resume and reduce
            })
    except Exception as exc:  # noqa: BLE001 - the shard or marker could not be written: no task of the batch is done
        try:
            shard.abort()
        except Exception:  # noqa: BLE001, S110 - the first error is the one reported
            pass
        exc.add_note(f"hats-margin: while writing the shard of the batch of map tasks {batch} ({len(tasks)} task(s))")
        for task in tasks:
            outcome.setdefault(task.key, (False, exc))
        return outcome
    except BaseException:
        shard.abort()
        raise
    for key, payload in payloads.items():
        outcome[key] = (True, payload)
    return {task.key: outcome[task.key] for task in tasks}


def map_partition(task: MapTask, shard: ShardWriters, batch: str, deferred: _Deferred) -> _Mapped:
    """Run one map task into its batch's ``shard`` (named ``batch``). The candidates of its small
    row groups may wait in ``deferred`` for one exact test with other tasks' (their rows are sent
    when the batch resolves it); the payload of the batch marker is known once the shard is
    closed (:meth:`_Mapped.payload`)."""
    writers = shard.source(task.source)
    try:
        no_position = _map(task, writers, deferred)
    except Exception as exc:
        _note_partition(exc, task)
        raise
    return _Mapped(task, writers, batch, no_position)


@dataclass
class _Mapped:
    """A map task that ran: what its batch marker records, once its rows are all in the shard."""

    task: MapTask
    writers: SourceShard
    batch: str
    rows_without_coordinates: int

    def payload(self) -> dict:
        """Rows sent and record batches per destination, the shard's name, and how many rows the
        task saw without usable coordinates (NaN/inf/null ra or dec)."""
        task, writers = self.task, self.writers
        rows = writers.margin_rows if task.margin_thresholds else writers.rows
        batches = writers.index
        return {
            "source": list(task.source),
            "shard": self.batch,
            "rows": {_marker_key(key): n for key, n in sorted(rows.items())},
            "batches": {_marker_key(key): batches[key] for key in sorted(batches)},  # read by the reduce tasks
            "rows_without_coordinates": self.rows_without_coordinates,
        }


def _note_partition(exc: Exception, task: MapTask):
    """Name the task's partition in an exception raised while mapping it."""
    exc.add_note(f"hats-margin: while mapping partition Norder={task.source[0]}/Npix={task.source[1]} ({task.leaf})")


def _marker_key(key: tuple[int, ...]) -> str:
    """``order_pixel`` of a destination; ``margin:order_pixel`` with several margins."""
    if len(key) == 3:
        return margin_key(Pixel(key[1], key[2]), key[0])
    return margin_key(Pixel(*key))


def _map(task: MapTask, writers: SourceShard, deferred: _Deferred) -> int:
    """Send the task's margin rows to its shard (some later, through ``deferred``); returns how
    many of the rows whose coordinates were checked have none (NaN/inf/null)."""
    dests = geometry.Tiling.from_pixels(task.dest_orders, task.dest_pixels)
    no_position = 0
    for path in leaf_files(task.leaf, task.input_suffix):
        parquet = open_parquet(path)
        check_file_schema(parquet, path, task.schema)
        first_row = 0
        for group in range(parquet.num_row_groups):
            no_position += _map_row_group(task, dests, parquet, path, group, writers, first_row, deferred)
            first_row += parquet.metadata.row_group(group).num_rows
    return no_position


SMALL_ROW_GROUP_BYTES = 1 << 20
"""Row groups below this decoded size are read whole in one call: for them the per-call cost of
three reads (index, ra/dec, the rest) exceeds decoding the columns a margin does not need."""


PREFETCH_MIN_PAIRS = 16
"""In exact mode, a large row group with at least this many candidate pairs has its other columns
decoded in a background thread while the exact test runs on the candidates (pyarrow releases the
GIL): the two overlap, and with this many candidates the decode is nearly always needed."""

LARGE_ROW_GROUP_BYTES = 32 << 20
"""Above this decoded size a row group's other columns are decoded a group of columns at a time
(``COLUMN_GROUP_BYTES`` each), keeping only the margin rows of each group: memory holds a few
columns of the row group, not all of it (a 100k-row group of a 110-column catalog is ~56 MB)."""

COLUMN_GROUP_BYTES = 8 << 20
"""Decoded bytes of the columns decoded together in a large row group (each call still decodes
its columns in parallel)."""

_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hats-margin-decode")
"""One decode ahead at most per process: a map task waits for its row group's decode before the
next row group is read, so memory stays one row group per task."""


class _RowGroup:
    """The columns of one row group read so far: each column is decoded at most once, the
    spatial index (and ra/dec in exact mode) first, the other columns only if margin rows remain."""

    def __init__(self, task, parquet, path, group):
        """Nothing decoded yet, except every column at once for a small row group."""
        self.task, self.parquet, self.path, self.group = task, parquet, path, group
        self.columns: dict[str, pa.ChunkedArray] = {}
        self._pending: Future | None = None
        self.decoded_bytes = parquet.metadata.row_group(group).total_byte_size
        self.small = self.decoded_bytes <= SMALL_ROW_GROUP_BYTES
        self.large = self.decoded_bytes > LARGE_ROW_GROUP_BYTES
        if self.small:
            self.read(task.schema.names)

    def detach(self):
        """Let go of the file of a small row group (decoded whole on creation): it may be kept
        after its file is closed."""
        if not self.small:
            raise ValueError("only a small row group is decoded whole")
        self.parquet = None

    def column_groups(self, names) -> list[list[str]]:
        """``names`` (top-level columns) in consecutive groups of about ``COLUMN_GROUP_BYTES``
        decoded bytes each (from the footer's column chunk sizes)."""
        meta = self.parquet.metadata.row_group(self.group)
        size: dict[str, int] = {}
        for i in range(meta.num_columns):
            chunk = meta.column(i)
            top = chunk.path_in_schema.split(".", 1)[0]
            size[top] = size.get(top, 0) + chunk.total_uncompressed_size
        groups, current, current_bytes = [], [], 0
        for name in names:
            if current and current_bytes + size.get(name, 0) > COLUMN_GROUP_BYTES:
                groups.append(current)
                current, current_bytes = [], 0
            current.append(name)
            current_bytes += size.get(name, 0)
        return groups + ([current] if current else [])

    def _decode(self, missing) -> pa.Table:
        """Decode the named columns (no bookkeeping: may run in the decode thread)."""
        return read_row_group(self.parquet, self.path, self.group, missing, use_threads=not self.small)

    def prefetch(self, names):
        """Start decoding the named columns not read yet in the background (not for small row
        groups; for large ones, only their first group of columns)."""
        missing = [n for n in names if n not in self.columns]
        if missing and self.large:
            missing = self.column_groups(missing)[0]
        if missing and not self.small and self._pending is None:
            self._pending = _DECODER.submit(self._decode, missing)

    def settle(self):
        """Wait for a background decode and keep its columns (its error is raised here)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            table = pending.result()
            self.columns.update(zip(table.column_names, table.columns))

    def abandon(self):
        """Wait for a background decode whose columns are not needed, ignoring its outcome (they
        would not have been decoded without the prefetch)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.exception()  # waits; the error, if any, is not this row group's to report

    def read(self, names):
        """Decode the named columns not read yet."""
        self.settle()
        missing = [n for n in names if n not in self.columns]
        if missing:
            table = self._decode(missing)
            self.columns.update(zip(table.column_names, table.columns))

    def table(self) -> pa.Table:
        """Every column of the catalog schema, in its order and types."""
        self.read(self.task.schema.names)
        names = self.task.schema.names
        return conform(pa.table([self.columns[n] for n in names], names=names), self.task.schema)

    def take(self, rows: np.ndarray) -> pa.Table:
        """The given rows (in that order) with every column of the catalog schema. A large row
        group is decoded a group of columns at a time, each group dropped once its rows are taken."""
        if not self.large:
            return self.table().take(arrow_of(rows))
        self.settle()
        indices = arrow_of(rows)
        names = self.task.schema.names
        taken = {name: column.take(indices) for name, column in self.columns.items()}
        self.columns.clear()  # the taken rows are all that is kept of these columns
        for group in self.column_groups([n for n in names if n not in taken]):
            table = self._decode(group)
            taken.update(zip(table.column_names, (column.take(indices) for column in table.columns)))
            del table
        return conform(pa.table([taken[n] for n in names], names=names), self.task.schema)


def _map_row_group(task: MapTask, dests, parquet, path, group, writers, first_row: int, deferred: _Deferred) -> int:
    """Send the margin rows of one row group to the shard, grouped by destination (or leave a small
    row group's candidates in ``deferred``). Returns how many of the rows whose coordinates were
    checked have none (NaN/inf/null)."""
    row_group = _RowGroup(task, parquet, path, group)
    try:
        return _select_and_send(task, dests, row_group, path, writers, first_row, deferred)
    finally:
        row_group.abandon()  # a decode nobody used: never left running into the next row group


def _select_and_send(task: MapTask, dests, row_group: _RowGroup, path, writers, first_row: int, deferred: _Deferred) -> int:
    """The body of :func:`_map_row_group` on a row group being read."""
    row_group.read([task.healpix_column, task.ra_column, task.dec_column] if task.fine_filtering else [task.healpix_column])
    index = row_group.columns[task.healpix_column]
    if index.null_count:
        raise InputCatalogError(f"{path}: the spatial index column {task.healpix_column!r} has null values")
    spatial_index = numpy_of(index).astype(np.int64, copy=False)
    _check_rows_in_partition(task, path, spatial_index)
    ra = dec = None
    no_position = 0
    if task.check_input:  # every row, at the cost of reading ra/dec of every row group
        ra, dec = _radec(task, row_group)
        no_position = _check_coordinates(task, path, first_row, ra, dec, spatial_index, None)
    if len(dests) == 0:
        return no_position
    rows, dest_idx = geometry.candidate_pairs(
        spatial_index, task.healpix_order, *task.source, task.search_order, task.rings, dests
    )
    if len(rows) == 0:
        return no_position
    if not task.fine_filtering:  # coarse: every candidate, its ra/dec checked in the rows taken
        taken = row_group.take(rows)
        selected, first = np.unique(rows, return_index=True)
        no_position = _check_coordinates(
            task, path, first_row, _float_array(taken.column(task.ra_column).take(arrow_of(first))),
            _float_array(taken.column(task.dec_column).take(arrow_of(first))),
            spatial_index[selected], None, positions=selected,
        )
        _send(writers, taken, dests, dest_idx)
        return no_position
    if ra is None:  # read anyway by the exact filter: check the candidates at no extra read
        ra, dec = _radec(task, row_group)
    if len(rows) >= PREFETCH_MIN_PAIRS:
        row_group.prefetch(task.schema.names)  # decoded while the candidates are tested
    if not task.check_input:
        no_position = _check_coordinates(task, path, first_row, ra, dec, spatial_index, np.unique(rows))
    candidates = _Candidates(task, writers, dests, row_group, CandidatePairs(
        ra, dec, spatial_index, task.healpix_order, max(task.search_order, task.source[0]), rows, dest_idx, dests,
    ))
    if row_group.small:  # decoded whole already: tested later, with other row groups' candidates
        deferred.add(candidates)
    else:
        candidates.send(pairs_within_thresholds_of_parts([candidates.pairs], task.thresholds)[0])
    return no_position


DEFER_BYTES = 16 << 20
"""Decoded bytes of small row groups whose candidates wait for one exact test together (a batch's
tasks, in order): the test costs a fixed ~0.5 ms of numpy calls per call, most of it on a catalog
of many small partitions with a few candidates each. The memory this holds beside the row group
being read."""

DEFER_ROW_GROUPS = 64
"""At most this many row groups wait (the gain of batching them levels off well before)."""


@dataclass
class _Candidates:
    """A row group's candidate pairs in exact mode, and where the pairs kept are sent."""

    task: MapTask
    writers: SourceShard
    dests: geometry.Tiling
    row_group: _RowGroup
    pairs: CandidatePairs

    def send(self, within: np.ndarray):
        """Send the pairs kept (``within``: per margin, per pair) to the shard: one take of every
        pair any margin keeps; with several margins each row is sent once, with the margins it is
        in (the shard's last column)."""
        union = np.flatnonzero(within.any(axis=0))
        if not len(union):
            return
        task = self.task
        taken = self.row_group.take(self.pairs.rows[union])
        sent_to = self.pairs.dest_idx[union]
        if task.margin_thresholds:
            in_margins = within[:, union]
            taken = taken.append_column(
                pa.field(MARGINS_COLUMN, margin_bits_type(len(in_margins)), nullable=False),
                arrow_of(_margin_bits(in_margins)),
            )
            _count_margin_rows(self.writers, in_margins, self.dests, sent_to)
        _send(self.writers, taken, self.dests, sent_to)


class _Deferred:
    """Small row groups' candidates waiting for one exact test together (``DEFER_BYTES``,
    ``DEFER_ROW_GROUPS``); their rows are sent, in the order they came, when the batch resolves
    them (when full, and before its shard is closed)."""

    def __init__(self):
        """Nothing waiting."""
        self.waiting: list[_Candidates] = []
        self.bytes = 0

    def add(self, candidates: _Candidates):
        """Let a small row group's candidates wait (the row group is decoded whole: its file is
        not needed any more)."""
        candidates.row_group.detach()
        self.waiting.append(candidates)
        self.bytes += candidates.row_group.decoded_bytes

    @property
    def full(self) -> bool:
        """Whether the waiting row groups should be resolved now."""
        return self.bytes >= DEFER_BYTES or len(self.waiting) >= DEFER_ROW_GROUPS

    def drop(self, key: str):
        """Forget the candidates of a failed task."""
        self.waiting = [c for c in self.waiting if c.task.key != key]
        self.bytes = sum(c.row_group.decoded_bytes for c in self.waiting)

    def resolve(self) -> list[tuple[MapTask, Exception]]:
        """Test every waiting candidate in one call (the tasks of a batch share their run's
        thresholds) and send the pairs kept; returns the tasks that failed, each with its error
        (naming its partition). A failed test fails every task waiting on it; a failed send fails
        its task only."""
        waiting, self.waiting, self.bytes = self.waiting, [], 0
        if not waiting:
            return []
        try:
            within = pairs_within_thresholds_of_parts([c.pairs for c in waiting], waiting[0].task.thresholds)
        except Exception as exc:  # noqa: BLE001 - reported for every task waiting on it
            sources = sorted({f"Norder={c.task.source[0]}/Npix={c.task.source[1]}" for c in waiting})
            exc.add_note(f"hats-margin: while testing the candidates of partitions {', '.join(sources)} together")
            return list({c.task.key: (c.task, exc) for c in waiting}.values())
        failed: dict[str, tuple[MapTask, Exception]] = {}
        for candidates, kept in zip(waiting, within):
            if candidates.task.key in failed:
                continue
            try:
                candidates.send(kept)
            except Exception as exc:  # noqa: BLE001 - this task fails alone
                _note_partition(exc, candidates.task)
                failed[candidates.task.key] = (candidates.task, exc)
                if candidates.writers.shard.broken:
                    break
        return list(failed.values())


def _margin_bits(in_margins: np.ndarray) -> np.ndarray:
    """Per row, the margins it is in as bits (bit k: row k of the boolean ``in_margins``)."""
    dtype = margin_bits_type(len(in_margins)).to_pandas_dtype()
    bits = np.zeros(in_margins.shape[1], dtype=dtype)
    for margin, inside in enumerate(in_margins):
        bits[inside] |= dtype(1) << dtype(margin)
    return bits


def _count_margin_rows(writers: SourceShard, in_margins: np.ndarray, dests, dest_idx: np.ndarray):
    """Add each destination's rows per margin to ``writers.margin_rows`` (``dest_idx`` sorted)."""
    runs = _runs(dest_idx)
    counts = np.add.reduceat(in_margins, [lo for lo, _ in runs], axis=1, dtype=np.int64)
    for run, (lo, _) in enumerate(runs):
        dest = (int(dests.orders[dest_idx[lo]]), int(dests.pixels[dest_idx[lo]]))
        for margin, n in enumerate(counts[:, run]):
            if n:
                key = (margin, *dest)
                writers.margin_rows[key] = writers.margin_rows.get(key, 0) + int(n)


def _send(writers, selected, dests, dest_idx):
    """Write the rows of ``selected`` (a compact table: taken rows) to their destinations
    ``dest_idx`` (sorted): a zero-copy slice per destination, its size its share of the rows of
    ``selected``."""
    row_bytes = selected.get_total_buffer_size() / max(selected.num_rows, 1)
    for lo, hi in _runs(dest_idx):
        dest = (int(dests.orders[dest_idx[lo]]), int(dests.pixels[dest_idx[lo]]))
        writers.write(dest, selected.slice(lo, hi - lo), round(row_bytes * (hi - lo)))


def _radec(task: MapTask, row_group: _RowGroup) -> tuple[np.ndarray, np.ndarray]:
    """ra and dec of every row of the row group as float64 (decoded once, kept for the table)."""
    row_group.read([task.ra_column, task.dec_column])
    return _float_array(row_group.columns[task.ra_column]), _float_array(row_group.columns[task.dec_column])


def _float_array(column) -> np.ndarray:
    """A numeric column as float64, nulls as NaN; a column that is not numeric is refused."""
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_decimal(column.type)):
        raise InputCatalogError(f"the ra/dec column is {column.type}, not a number of degrees")
    if column.null_count == 0 and pa.types.is_floating(column.type):  # without pyarrow's numpy conversion
        return numpy_of(column).astype(np.float64, copy=False)
    return np.asarray(column.cast(pa.float64()).fill_null(np.nan).to_numpy(), dtype=np.float64)


def _check_coordinates(task: MapTask, path, first_row, ra, dec, spatial_index, rows, positions=None) -> int:
    """Refuse rows whose ra/dec contradict their spatial index; return how many have none.

    ``rows`` selects rows of ``ra``/``dec``/``spatial_index`` (None: all of them);
    ``positions`` gives the row numbers in the row group of the arrays' entries (default: the
    entry's own index)."""
    if rows is not None:
        ra, dec, spatial_index, positions = ra[rows], dec[rows], spatial_index[rows], rows
    result = check_coordinates(ra, dec, spatial_index, task.healpix_order)
    if len(result.contradicting):
        first = int(result.contradicting[0])
        row = first_row + int(first if positions is None else positions[first])
        raise InputCatalogError(
            f"partition Norder={task.source[0]}/Npix={task.source[1]} ({path}), row {row}: "
            f"{task.ra_column}={float(ra[first])!r}, {task.dec_column}={float(dec[first])!r} is not in the HEALPix cell of its "
            f"{task.healpix_column}={int(spatial_index[first])} ({len(result.contradicting)} such row(s) in this "
            "row group): the coordinates contradict the spatial index (is hats_col_ra/hats_col_dec the right "
            "column? were ra/dec edited after partitioning?)"
        )
    return len(result.non_finite)


def _check_rows_in_partition(task: MapTask, path, spatial_index):
    """Raise :class:`InputCatalogError` if any row's spatial index lies outside the task's source partition."""
    order, pixel = task.source
    owner = spatial_index >> (2 * (task.healpix_order - order))
    wrong = np.flatnonzero(owner != pixel)
    if len(wrong):
        raise InputCatalogError(
            f"{path}: {len(wrong)} row(s) have a spatial index outside partition Norder={order}/Npix={pixel} "
            f"(first: {task.healpix_column}={int(spatial_index[wrong[0]])}, which is in order-{order} pixel "
            f"{int(owner[wrong[0]])}); the catalog is mis-partitioned"
        )


def _runs(sorted_keys: np.ndarray):
    """(lo, hi) bounds of the runs of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return []
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    bounds = np.concatenate([[0], cuts, [len(sorted_keys)]])
    return list(itertools.pairwise(bounds))

"""Reducing: one task per destination pixel streams its rows into the final margin file.

From the shard of the batch of map tasks of each source partition sending it rows it reads only
its own record batches (listed in the batch's marker). Source partitions cover disjoint spatial-index ranges, so
sorting consecutive sources' rows together (up to ``SORT_GROUP_BYTES``, one sort for the many small
sources of a small margin) and writing the groups in range order gives a file sorted by the
spatial index, with memory bounded by one source's rows (or one group) plus one row group.

Reduce tasks run in batches (``reduce_batch``, one Dask task) of neighbouring pixels, or of the
margins of one pixel when several are built from one read; the batch opens each shard once.

The file is written under a temporary name beside its final one and renamed only when it
holds every row: a failing reduce never truncates or half-writes a published file. So the
published file is the task's done marker (a resumed run skips the pixels whose file is there
with the expected rows): no marker file per margin pixel, which on a catalog of many small
partitions cost as much as the reduce work itself (one file creation each).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
from upath import UPath

from hats_margin.io import (
    MarginFileWriter,
    ShardReaders,
    TempLayout,
    publish,
    remove_file,
    rows_of_margin,
    temporary_sibling,
)
from hats_margin.pixel import Pixel

SORT_GROUP_BYTES = 8 << 20
"""Rows of consecutive sources gathered before one sort and write: one sort per margin file for
the small ones, a bounded buffer for the large."""


@dataclass(frozen=True)
class ReduceTask:
    """Everything one reduce task needs: one margin pixel, the shards that hold its rows, and
    its output file. ``expected_rows`` is what the map tasks reported sending; a different count
    written is an error.
    """

    key: str
    pixel: Pixel
    sources: tuple[tuple[int, int, str, tuple[int, ...]], ...]
    """(order, pixel, its batch's shard, record batches of that shard) of every source partition
    sending rows, in spatial-index order."""
    expected_rows: int
    output_file: UPath
    schema: pa.Schema
    healpix_column: str
    write_kwargs: dict
    layout: TempLayout
    """Where this margin's done markers go."""
    shard_layout: TempLayout | None = None
    """Where the map tasks' shards are, when not in ``layout`` (several margins from one read
    share the shards of the largest threshold's layout)."""
    margin: int | None = None
    """Several margins from one read: this margin's index. The shards' record batches hold the rows
    of every margin, each row marked with its margins (``io.MARGINS_COLUMN``); the task keeps its own."""

    @property
    def shards(self) -> TempLayout:
        """Where this task's shards are."""
        return self.shard_layout or self.layout


def weight(task: ReduceTask) -> int:
    """A reduce task's expected cost for ordering batches: its rows, plus 1,000 for the file (a small
    margin file costs its opening, footer and publishing whatever its rows)."""
    return task.expected_rows + 1000


WRITE_THREADS = 2
"""Threads per reduce batch that encode and publish its small margin files while the batch's own
thread reads and sorts the next task's rows. pyarrow encodes without the GIL, and a small file
costs its encoding (~50 us per column: 6 ms for a 110-column catalog), footer and rename more
than its reading."""

WRITE_BEHIND = 3
"""Small files of a batch handed to the write threads and not yet published, at most: memory
holds at most this many small files (each under ``io.SMALL_FILE_BYTES``) beside the task at work."""


def reduce_batch(tasks: list[ReduceTask]) -> dict[str, tuple[bool, object]]:
    """Run a batch of reduce tasks (one Dask task), sharing the opened shards; each task's
    outcome is kept apart, as ``runner.run_stage`` expects of a batch function.

    A task whose file is small (encoded in memory) is closed, checked and published by the
    batch's write threads while the next task reads its rows; at most ``WRITE_BEHIND`` wait
    there, and every one has ended (published or failed) when the batch returns."""
    outcome: dict[str, tuple[bool, object]] = {}
    behind: deque[tuple[str, Future]] = deque()

    def settle_oldest():
        key, future = behind.popleft()
        exc = future.exception()
        outcome[key] = (True, future.result()) if exc is None else (False, exc)

    shared = PixelRows()
    with ShardReaders() as readers, ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="hats-margin-write") as writer:
        try:
            for task in tasks:
                try:
                    result = reduce_pixel(task, readers, writer.submit, shared)
                except Exception as exc:  # noqa: BLE001 - reported by the driver, with the task's notes
                    outcome[task.key] = (False, exc)
                    continue
                if not isinstance(result, Future):
                    outcome[task.key] = (True, result)
                    continue
                behind.append((task.key, result))
                while len(behind) > WRITE_BEHIND:
                    settle_oldest()
        finally:
            while behind:  # nothing left running when the batch returns or fails
                settle_oldest()
    return {task.key: outcome[task.key] for task in tasks}


def reduce_pixel(task: ReduceTask, readers: ShardReaders | None = None,
                 defer: Callable[[Callable[[], dict]], Future] | None = None,
                 shared: PixelRows | None = None) -> dict | Future:
    """Write one margin pixel's file from its shards; publishing it marks the task done. Returns
    its rows and footer (finishing builds ``_metadata`` from the footers without re-reading).
    ``readers``: the shards its batch has open (else it opens its own). ``defer``: for a small
    file, its last step (encode, write, check, publish) is handed to ``defer`` (an executor's
    ``submit``) and the Future it returns is returned instead. ``shared``: the sorted rows of the
    pixel that its batch's previous task (another margin of this pixel) read, if any."""
    if readers is None:
        with ShardReaders() as own:
            return reduce_pixel(task, own, defer, shared)
    complete, small = _fill(task, readers, shared)
    if small and defer is not None:
        return defer(complete)
    return complete()


class PixelRows:
    """The sorted rows (every margin's, each marked with its margins) of the last pixel a reduce
    batch read whole, when several margins are built from one read: the margins of a pixel come
    one after another, largest first, and the next ones keep their rows from these instead of
    reading and sorting them again. At most one pixel, of at most ``SORT_GROUP_BYTES``."""

    def __init__(self):
        self._key = None
        self._sources: frozenset = frozenset()
        self._rows: pa.Table | None = None

    def get(self, task: ReduceTask) -> pa.Table | None:
        """The rows kept, if they are of ``task``'s pixel and hold every source it reads."""
        if task.margin is None or self._key != (task.pixel, str(task.shards.base)):
            return None
        return self._rows if self._sources.issuperset(task.sources) else None

    def keep(self, task: ReduceTask, rows: pa.Table | None):
        """Keep ``rows``: every row of ``task``'s sources, sorted (None: keep nothing)."""
        self._key = None if rows is None else (task.pixel, str(task.shards.base))
        self._sources, self._rows = (frozenset(), None) if rows is None else (frozenset(task.sources), rows)


def _fill(task: ReduceTask, readers: ShardReaders, shared: PixelRows | None = None) -> tuple[Callable[[], dict], bool]:
    """Read the pixel's rows from its shards, sorted, into the writer of its temporary file.

    Returns the step that closes the file, checks its rows and publishes it (returning what
    :func:`reduce_pixel` returns), and whether the file is small (still in memory: that step then
    encodes and writes it whole). A failure here or in that step removes the temporary file and
    names the pixel."""
    temporary = temporary_sibling(task.output_file)

    def failed(exc: Exception):
        remove_file(temporary)
        exc.add_note(f"hats-margin: while reducing margin pixel Norder={task.pixel[0]}/Npix={task.pixel[1]}")

    try:
        writer = MarginFileWriter(temporary, task.schema, task.write_kwargs)
        try:
            _copy_sorted(task, readers, writer, shared)
        except BaseException:
            writer.close()
            raise
    except Exception as exc:
        failed(exc)
        raise

    def complete() -> dict:
        try:
            writer.close()
            if writer.rows != task.expected_rows:
                raise RuntimeError(
                    f"margin pixel {task.key}: wrote {writer.rows} rows, the map stage sent {task.expected_rows}"
                )
            publish(temporary, task.output_file)
        except Exception as exc:
            failed(exc)
            raise
        return {"pixel": list(task.pixel), "rows": writer.rows, "footer": writer.metadata}

    return complete, not writer.streaming


def _copy_sorted(task: ReduceTask, readers: ShardReaders, writer: MarginFileWriter, shared: PixelRows | None):
    """Write the task's rows to ``writer`` sorted by the spatial index: kept in ``shared`` if
    another margin of the pixel read them, else read source after source and sorted in groups of
    up to ``SORT_GROUP_BYTES`` (with several margins, a pixel read in one group is kept there)."""
    kept = shared.get(task) if shared is not None else None
    if kept is not None:
        writer.write(_own_rows(kept, task))
        return
    if shared is not None:
        shared.keep(task, None)  # another pixel: its rows are not kept beside this one's
    group, group_bytes, groups = [], 0, 0
    for _, _, batch, batches in task.sources:
        table = readers.read(task.shards, batch, batches)
        group.append(table)
        group_bytes += table.get_total_buffer_size()  # its own buffers: nbytes, 30x cheaper
        if group_bytes >= SORT_GROUP_BYTES:
            writer.write(_own_rows(_sorted(group, task.healpix_column), task))
            group, group_bytes, groups = [], 0, groups + 1
    if group:
        rows = _sorted(group, task.healpix_column)
        if not groups and task.margin is not None and shared is not None:
            shared.keep(task, rows)
        writer.write(_own_rows(rows, task))


def _own_rows(rows: pa.Table, task: ReduceTask) -> pa.Table:
    """The rows of ``task``'s margin among ``rows`` (all of them for a single margin)."""
    return rows if task.margin is None else rows_of_margin(rows, task.margin)


def _sorted(tables: list[pa.Table], column: str) -> pa.Table:
    """The rows of consecutive sources, sorted by the spatial index (a stable sort: keeping one
    margin's rows of the sorted rows gives that margin's rows sorted, in the same order)."""
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return table.sort_by(column)

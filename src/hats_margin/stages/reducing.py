"""Reducing: one task per destination pixel streams its rows into the final margin file.

From the shard of the batch of map tasks of each source partition sending it rows it reads only
its own record batches (listed in the batch's marker). Source partitions cover disjoint spatial-index ranges, so
sorting each source's rows and writing the sources in range order gives a file sorted by the
spatial index, with memory bounded by one source's rows plus one row group.

The file is written under a temporary name beside its final one and renamed only when it
holds every row: a failing reduce never truncates or half-writes a published file. So the
published file is the task's done marker (a resumed run skips the pixels whose file is there
with the expected rows): no marker file per margin pixel, which on a catalog of many small
partitions cost as much as the reduce work itself (one file creation each).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from upath import UPath

from hats_margin.io import (
    MarginFileWriter,
    TempLayout,
    publish,
    read_shard,
    remove_file,
    temporary_sibling,
)
from hats_margin.pixel import Pixel


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


def reduce_pixel(task: ReduceTask) -> dict:
    """Write one margin pixel's file from its shards; publishing it marks the task done. Returns
    its rows and footer (finishing builds ``_metadata`` from the footers without re-reading)."""
    temporary = temporary_sibling(task.output_file)
    try:
        writer = MarginFileWriter(temporary, task.schema, task.write_kwargs)
        try:
            shards = task.shard_layout or task.layout
            for _, _, batch, batches in task.sources:
                shard = read_shard(shards.shard(batch), batches)
                writer.write(shard.sort_by(task.healpix_column))
        finally:
            writer.close()
        if writer.rows != task.expected_rows:
            raise RuntimeError(
                f"margin pixel {task.key}: wrote {writer.rows} rows, the map stage sent {task.expected_rows}"
            )
        publish(temporary, task.output_file)
    except Exception as exc:
        remove_file(temporary)
        exc.add_note(f"hats-margin: while reducing margin pixel Norder={task.pixel[0]}/Npix={task.pixel[1]}")
        raise
    return {"pixel": list(task.pixel), "rows": writer.rows, "footer": writer.metadata}

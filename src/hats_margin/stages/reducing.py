"""Reducing: one task per destination pixel streams its rows into the final margin file.

From the shard of each source partition sending it rows it reads only its own record batches
(listed in the map task's marker). Source partitions cover disjoint spatial-index ranges, so
sorting each source's rows and writing the sources in range order gives a file sorted by the
spatial index, with memory bounded by one source's rows plus one row group.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from upath import UPath

from hats_margin.io import MarginFileWriter, TempLayout, read_json, read_shard, write_json


@dataclass(frozen=True)
class ReduceTask:
    key: str
    pixel: tuple[int, int]
    sources: tuple[tuple[int, int, tuple[int, ...]], ...]
    """(order, pixel, record batches of its shard) of every source partition sending rows, in
    spatial-index order."""
    expected_rows: int
    output_file: UPath
    schema: pa.Schema
    healpix_column: str
    write_kwargs: dict
    layout: TempLayout


def reduce_pixel(task: ReduceTask) -> dict:
    marker = task.layout.reduce_marker(*task.pixel)
    done = read_json(marker)
    if done is not None and done.get("rows") == task.expected_rows:
        return done
    try:
        writer = MarginFileWriter(task.output_file, task.schema, task.write_kwargs)
        try:
            for src_order, src_pixel, batches in task.sources:
                shard = read_shard(task.layout.shard(src_order, src_pixel), batches)
                writer.write(shard.sort_by(task.healpix_column))
        finally:
            writer.close()
        if writer.rows != task.expected_rows:
            raise RuntimeError(
                f"margin pixel {task.key}: wrote {writer.rows} rows, the map stage sent {task.expected_rows}"
            )
    except Exception as exc:
        exc.add_note(f"hats-margin: while reducing margin pixel Norder={task.pixel[0]}/Npix={task.pixel[1]}")
        raise
    payload = {"pixel": list(task.pixel), "rows": writer.rows}
    write_json(marker, payload)
    return payload

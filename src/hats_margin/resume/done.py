"""Which tasks an earlier run finished: a map task listed in the done marker of its batch
(``mapping/<batch>.json``),
a reduce task's published margin file (renamed into place only when complete) holding the rows
the map stage sent it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin.io import (
    INTERMEDIATE_FORMAT,
    TempLayout,
    file_key,
    is_local,
    listed_files,
    read_footer,
    read_json,
)

if TYPE_CHECKING:  # pragma: no cover
    from hats_margin.stages.reducing import ReduceTask


def done_maps(layout: TempLayout) -> dict[str, dict]:
    """The map tasks an earlier run finished: ``order_pixel`` -> the payload its batch's done marker
    (``mapping/<batch>.json``) records for it; empty if none. A task listed by two markers (a batch
    re-run by Dask after its worker died past the marker) is taken from the first by name: each
    names a complete shard. An unreadable marker counts as absent (its tasks are redone)."""
    markers = layout.map_markers()
    if is_local(layout.base):
        contents = [read_json(m) for m in markers]
    else:
        with ThreadPoolExecutor(max_workers=16) as pool:
            contents = list(pool.map(read_json, markers))
    done: dict[str, dict] = {}
    for content in contents:
        if not content or content.get("format") != INTERMEDIATE_FORMAT:
            continue
        for key, payload in content.get("tasks", {}).items():
            done.setdefault(key, payload)
    return done


def done_reduces(build_path: UPath, reduce_tasks: list[ReduceTask]) -> set[str]:
    """Keys of the reduce tasks whose margin file an earlier run published with the rows the map
    stage sent it. One listing of the dataset directory, then the footers of the files found."""

    def rows(task: ReduceTask) -> int | None:
        """Rows in the task's published file (None: unreadable, so redo it)."""
        try:
            return read_footer(task.output_file).num_rows
        except (OSError, ValueError):  # unreadable (pyarrow's ArrowInvalid is a ValueError): redo it
            return None

    listed = listed_files(build_path / "dataset")
    found = [t for t in reduce_tasks if file_key(t.output_file) in listed]
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(rows, found))
    return {t.key for t, n in zip(found, counts) if n == t.expected_rows}

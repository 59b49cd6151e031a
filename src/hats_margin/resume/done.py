"""Which tasks an earlier run finished: a map task's done marker (``mapping/<order>_<pixel>.json``),
a reduce task's published margin file (renamed into place only when complete) holding the rows
the map stage sent it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin.io import TempLayout, file_key, listed_files, read_footer

if TYPE_CHECKING:  # pragma: no cover
    from hats_margin.stages.reducing import ReduceTask


def done_maps(layout: TempLayout) -> set[str]:
    """Keys (``order_pixel``) of the map tasks whose done marker is in ``layout``; empty if none."""
    directory = layout.base / "mapping"
    if not directory.exists():
        return set()
    return {p.name[: -len(".json")] for p in directory.iterdir() if p.name.endswith(".json")}


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

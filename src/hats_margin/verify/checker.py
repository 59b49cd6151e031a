"""The verification as a whole: open both catalogs, check the link and the structure on the
driver, then compare the rows in batches of destination pixels, in-process or as Dask tasks
(one task per batch, through hats_margin.runner like the build's stages)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from hats_margin.errors import ArgumentError
from hats_margin.verify.batch import BatchCheck
from hats_margin.verify.catalogs import MarginCatalog, PrimaryCatalog, as_upath, resolve_primary
from hats_margin.verify.report import VerifyReport, finish, merge
from hats_margin.verify.structure import check_structure, primary_mismatch
from hats_margin.verify.tiles import MAX_ORDER, Tiles, cell_order_for

logger = logging.getLogger(__name__)

TILE_WEIGHT_ROWS = 1000
"""A destination tile costs about as much as this many margin rows (its sources' reads) when
batches are cut for the workers."""


@dataclass
class Context:
    """Everything a batch needs (pickled once per Dask task)."""

    margin: MarginCatalog
    primary: PrimaryCatalog
    tiles: Tiles
    threshold: float
    exact: bool
    max_examples: int
    rtol: float

    def __post_init__(self):
        """Derive the candidate-search cell order, the index shift to order 29 and the source tiles."""
        self.cell_order = cell_order_for(self.threshold)
        self.shift_index = 2 * (MAX_ORDER - self.primary.healpix_order)
        self.sources = [self.tiles.index[p] for p in self.primary.partitions]


@dataclass(frozen=True)
class BatchTask:
    """One Dask task of a verification: the destination tiles ``tiles`` to check, with the shared context."""

    key: str
    ctx: Context
    tiles: np.ndarray


def check_batch(task: BatchTask) -> VerifyReport:
    """One batch's partial report (the function each Dask task runs)."""
    return BatchCheck(task.ctx).run(task.tiles)


def verify_margin(
    margin_path,
    primary_path=None,
    *,
    threshold_arcsec: float | None = None,
    max_examples: int = 20,
    exact: bool | None = None,
    rtol: float = 1e-9,
    max_rows_in_memory: int = 20_000_000,
    client=None,
    progress_bar: bool = False,
) -> VerifyReport:
    """Recompute every margin pixel of ``margin_path`` from ``primary_path`` and compare.

    Parameters
    ----------
    margin_path : str | Path | UPath
        The margin catalog directory (local, S3, HTTP...).
    primary_path : str | Path | UPath | None
        The primary catalog (or a collection: its primary); default the margin's
        ``hats_primary_table_url`` (absolute, or relative to the working directory, the
        margin's parent directory or the one above).
    threshold_arcsec : float | None
        Default: the margin's ``hats_margin_threshold``.
    max_examples : int
        Examples kept per kind of problem.
    exact : bool | None
        Whether extra rows are failures. Default: the margin's ``hats_margin_fine_filtering``
        property (absent, as in hats-import margins, means coarse).
    rtol : float
        Rows within ``rtol * threshold`` of the threshold are *borderline*, not missing/extra.
    max_rows_in_memory : int
        Margin rows per batch of destination pixels (bounds each task's memory).
    client : distributed.Client | None
        Compare the batches as tasks on this Dask cluster; None: in this process.
    progress_bar : bool
        A progress bar over the batches (with a client).

    A margin that records another primary, or whose schema is not the primary's, is reported
    with one structural problem and no row comparison.
    """
    start = time.perf_counter()
    if not isinstance(max_examples, int) or max_examples < 0:
        raise ArgumentError(f"max_examples must be a whole number >= 0, got {max_examples!r}")
    margin = MarginCatalog(as_upath(margin_path))
    primary = PrimaryCatalog(resolve_primary(margin, primary_path))
    threshold = float(threshold_arcsec if threshold_arcsec is not None else margin.threshold_arcsec())
    if not math.isfinite(threshold) or threshold <= 0:
        raise ArgumentError(f"threshold_arcsec must be a positive number of arcseconds, got {threshold!r}")
    if exact is None:
        exact = margin.properties.get("hats_margin_fine_filtering", "false").strip().lower() == "true"
    report = VerifyReport(str(margin.path), str(primary.path), threshold, bool(exact))
    mismatch = primary_mismatch(margin, primary)
    if mismatch:
        report.structural.append(mismatch)
        report.seconds = time.perf_counter() - start
        return report
    tiles = Tiles(primary.partitions + primary.negative)
    problem = tiles.check_cover()
    if problem:
        report.structural.append(problem)
    file_rows = check_structure(margin, primary, tiles, threshold, report)
    report.pixels = len(file_rows)
    ctx = Context(margin, primary, tiles, threshold, bool(exact), max_examples, rtol)
    threads = _threads(client)
    batches = list(cut_batches(len(tiles), file_rows, max(1, int(max_rows_in_memory)), threads))
    tasks = [BatchTask(f"batch{number}", ctx, batch) for number, batch in enumerate(batches)]
    logger.info("verify %s: %d destination pixels in %d batch(es)", margin.path, len(tiles), len(tasks))
    if client is None:
        parts = [check_batch(task) for task in tasks]
    else:
        from hats_margin.runner import run_stage

        results = run_stage(client, "Verifying", check_batch, tasks, progress_bar=progress_bar)
        parts = [results[task.key] for task in tasks]
    for part in parts:
        merge(report, part, max_examples)
    finish(report)
    report.seconds = time.perf_counter() - start
    return report


def cut_batches(n_tiles: int, file_rows: dict[int, int], budget: int, threads: int):
    """Destination tiles in nested order, cut into contiguous batches: each under ``budget``
    margin rows, and about ``2 * threads`` of them when that fits (parallel work for the
    workers). Every tile is in exactly one batch (tiles without a file may still be owed rows)."""
    weights = np.full(n_tiles, TILE_WEIGHT_ROWS, dtype=np.int64)
    for tile, rows in file_rows.items():
        weights[tile] += rows
    target = max(1, -(-int(weights.sum()) // (2 * threads))) if threads > 1 else None
    batch, rows, weight = [], 0, 0
    for tile in range(n_tiles):
        n = file_rows.get(tile, 0)
        if batch and (rows + n > budget or (target is not None and weight >= target)):
            yield np.array(batch)
            batch, rows, weight = [], 0, 0
        batch.append(tile)
        rows += n
        weight += int(weights[tile])
    if batch:
        yield np.array(batch)


def _threads(client) -> int:
    """Worker threads of the client's cluster (1 without a client or if it cannot say)."""
    if client is None:
        return 1
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 - a scheduler that cannot answer: one thread
        return 1

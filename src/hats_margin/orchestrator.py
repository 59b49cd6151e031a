"""The margin cache pipeline: who does what.

- ``planning`` (driver): checks the input and output, resolves the margin order, and
  builds one small spec per source partition (its reachable destination pixels).
- ``mapping`` (workers, one task per source partition, sent in batches that share one shard and
  one done marker): streams the partition row group by row group and writes, per destination
  pixel, the rows that belong to its margin.
- ``reducing`` (workers, one task per margin pixel): merges its shards, sorted by the
  spatial index, into the final parquet file.
- ``finishing`` (driver): ``_metadata``, ``partition_info.csv``, ``hats.properties``
  (last), then removes the intermediate files.
- ``collection`` (driver): when the input is a HATS collection, the new margin is added to
  its ``collection.properties`` (``all_margins``, ``default_margin`` when unset).

Several thresholds (``margin_threshold=[5, 10, 60]``) go to ``many``: one run per margin for
everything a run owns, one shared map stage.

``pipeline(args)`` owns a local Dask cluster; ``pipeline_with_client(args, client)``
borrows the caller's client. Every task is idempotent and leaves a done marker (the JSON marker
of its batch of map tasks, listing each; a reduce task's margin file, published only when
complete), so a re-run with the same arguments resumes where a killed run stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin import notify, resume, runner
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import ArgumentError, StageFailedError
from hats_margin.prechecks import precheck

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from hats_margin.stages.planning import Plan

# hats, the stages and dask.distributed are imported when first needed: a mistake in the
# arguments or the output location is reported before they load (about a second).

logger = logging.getLogger(__name__)

@dataclass
class MarginCacheResult:
    """What a run wrote."""

    catalog_path: UPath
    total_rows: int
    pixels: list[tuple[int, int]]
    margin_order: int
    margin_threshold: float
    fine_filtering: bool
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage: planning, cluster start/stop (pipeline() only), mapping, reducing, finishing."""
    skipped_tasks: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float | None = None
    """Wall time of the whole pipeline()/pipeline_with_client() call (None: the sum of the stages)."""
    rows_without_coordinates: int = 0
    """rows checked (candidates, or every row with check_input) whose ra or dec is NaN/inf/null"""

    def summary(self) -> str:
        """One line for the log: rows, pixel files, output path, mode, threshold, order and seconds per stage."""
        mode = "exact" if self.fine_filtering else "coarse"
        elapsed = sum(self.stage_seconds.values()) if self.elapsed_seconds is None else self.elapsed_seconds
        split = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in self.stage_seconds.items())
        text = (
            f"wrote {self.total_rows} margin rows in {len(self.pixels)} pixel file(s) to {self.catalog_path} "
            f"({mode}, threshold {self.margin_threshold:g} arcsec, margin order {self.margin_order}, "
            f"{elapsed:.1f} s: {split})"
        )
        if self.rows_without_coordinates:
            text += f"; {self.rows_without_coordinates} row(s) with NaN/inf/null ra/dec had no position"
        return text


@dataclass
class ManyMarginsResult:
    """What a run building several margins from one read wrote: one result per margin, in the
    order of the thresholds given."""

    margins: list[MarginCacheResult]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    elapsed_seconds: float | None = None

    @property
    def total_rows(self) -> int:
        """Rows written over every margin."""
        return sum(m.total_rows for m in self.margins)

    def summary(self) -> str:
        """One line for the run (whole time and stage split), then one per margin."""
        elapsed = sum(self.stage_seconds.values()) if self.elapsed_seconds is None else self.elapsed_seconds
        split = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in self.stage_seconds.items())
        lines = [f"{len(self.margins)} margins from one read of the catalog, {elapsed:.1f} s: {split}"]
        for m in self.margins:
            lines.append(
                f"  {m.catalog_path}: {m.total_rows} rows in {len(m.pixels)} pixel file(s) "
                f"(threshold {m.margin_threshold:g} arcsec, margin order {m.margin_order})"
            )
        return "\n".join(lines)


@dataclass
class _Prepared:
    """A planned run that holds the output lock: everything checked, no worker needed yet."""

    plan: Plan
    start: resume.Start

    @property
    def lock(self) -> resume.OutputLock:
        """The output lock this run holds."""
        return self.start.lock


def pipeline(args: MarginCacheArguments) -> MarginCacheResult | ManyMarginsResult:
    """Build the margin on a local Dask cluster made from the ``dask_*`` arguments (several
    thresholds: every margin from one read, returning a ManyMarginsResult).

    Every check that needs no worker (arguments, input catalog, output location and ownership,
    resume fingerprint) runs before the cluster starts. One worker (the default) runs as threads
    in this process: no worker process to start. More workers are processes, started only then.
    """
    _check_args(args)
    if args.dask_n_workers > 1:
        runner.check_main_guard()
    return _pipeline(args, None)


def pipeline_with_client(args: MarginCacheArguments, client: Client) -> MarginCacheResult | ManyMarginsResult:
    """Build the margin with the caller's Dask client (local, remote scheduler, SLURM...)."""
    _check_args(args)
    return _pipeline(args, client)


def _check_args(args):
    """Raise :class:`ArgumentError` unless ``args`` is a :class:`MarginCacheArguments`."""
    if not isinstance(args, MarginCacheArguments):
        raise ArgumentError(f"args must be MarginCacheArguments, not {type(args).__name__}")


def _pipeline(args: MarginCacheArguments, client: Client | None) -> MarginCacheResult | ManyMarginsResult:
    """Plan (no worker), then run the stages on ``client`` or on a local cluster started for them;
    email the outcome. The elapsed time covers the whole call."""
    if args.margins:
        from hats_margin import many

        return many.pipeline_many(args, client)
    start = time.perf_counter()
    clock = runner.StageClock()
    try:
        prepared = _prepare(args, clock)
        try:
            if prepared.start.complete:
                result = _complete_earlier_run(prepared.plan, clock)
            else:
                with runner.client_for(args, client, clock) as run_client:
                    result = _execute(prepared, run_client, clock)
        finally:
            prepared.lock.release()
        from hats_margin import collection

        if collection.is_collection(args.input_catalog_path):
            collection.register_margin(args.input_catalog_path, result.catalog_path)
    except Exception as exc:
        notify.send_completion_email(
            args, success=False, body=f"elapsed: {time.perf_counter() - start:.1f} s\n\nFailed with:\n\n{exc}"
        )
        raise
    result.elapsed_seconds = time.perf_counter() - start
    logger.info("%s", result.summary())
    notify.send_completion_email(
        args,
        success=True,
        body=(
            f"catalog: {result.catalog_path}\nrows written: {result.total_rows}\n"
            f"pixels written: {len(result.pixels)}\nelapsed: {result.elapsed_seconds:.1f} s"
        ),
    )
    return result


def _prepare(args: MarginCacheArguments, clock: runner.StageClock) -> _Prepared:
    """Planning: the cheap checks first (no heavy import), then the input catalog, the plan, the
    output lock and what is already at the output. Returns holding the lock."""
    with clock("planning"):
        precheck(args)
        from hats_margin.stages import planning

        with runner.progress("Planning", 3, args.progress_bar) as bar:
            plan = planning.make_plan(args)
            planning.warn_on_large_margin(plan)
            bar.update(1)
            start = resume.start(plan)
            bar.update(2)
    return _Prepared(plan, start)


def _map_stage(plan, start, client: Client, hint: str) -> tuple[dict[str, dict], int]:
    """Run the map tasks that are not done yet. Returns every map task's result (those done by an
    earlier run read from their markers) and how many were skipped."""
    from hats_margin.stages import mapping

    done = start.done_maps()
    todo = [t for t in plan.map_tasks if t.key not in done]
    skipped = len(plan.map_tasks) - len(todo)
    results = runner.run_stage(
        client, "Mapping", mapping.map_batch, todo,
        progress_bar=plan.args.progress_bar, skipped=skipped, resume_hint=hint, batched=True,
    )
    for task in plan.map_tasks:
        if task.key not in results:
            results[task.key] = done[task.key]
    return results, skipped


def _execute(prepared: _Prepared, client: Client, clock: runner.StageClock) -> MarginCacheResult:
    """Map, reduce and finish on the cluster (the lock is held by the caller)."""
    from hats_margin.stages import finishing, planning, reducing

    plan, start = prepared.plan, prepared.start
    args = plan.args
    hint = (
        f"Fix the cause and run again with the same arguments to resume; work done so far is kept in "
        f"{plan.layout.base}."
    )
    with clock("mapping"):
        results, skipped_map = _map_stage(plan, start, client, hint)
        no_position = _warn_rows_without_coordinates(results, args.fine_filtering)
    reduce_tasks = planning.make_reduce_tasks(plan, results)
    with clock("reducing"):
        done = start.done_reduces(reduce_tasks)
        todo = [t for t in reduce_tasks if t.key not in done]
        reduced = runner.run_stage(
            client, "Reducing", reducing.reduce_batch, todo, progress_bar=args.progress_bar,
            skipped=len(reduce_tasks) - len(todo), resume_hint=hint, batched=True, weight=reducing.weight,
        )
    with clock("finishing"), runner.progress("Finishing", 2, args.progress_bar) as bar:
        try:
            start.lock.set_phase("finishing")
            footers = {tuple(r["pixel"]): r["footer"] for r in reduced.values()}
            summary = finishing.finish(plan, {t.pixel: t.expected_rows for t in reduce_tasks}, footers)
            bar.update(1)
            finishing.clean_up(plan)
            resume.publish(plan)
        except Exception as exc:
            raise StageFailedError("finishing", {"finishing": exc}, hint) from exc
        bar.update(1)
    return MarginCacheResult(
        catalog_path=args.catalog_path,
        total_rows=summary["total_rows"],
        pixels=summary["pixels"],
        margin_order=plan.margin_order,
        margin_threshold=plan.threshold_arcsec,
        fine_filtering=args.fine_filtering,
        stage_seconds=clock.seconds,
        skipped_tasks={"mapping": skipped_map, "reducing": len(reduce_tasks) - len(todo)},
        rows_without_coordinates=no_position,
    )


def _warn_rows_without_coordinates(map_results: dict[str, dict], fine_filtering: bool) -> int:
    """Count (and warn about) the rows the map tasks found without ra/dec."""
    counts = {key: int(payload.get("rows_without_coordinates", 0)) for key, payload in map_results.items()}
    total = sum(counts.values())
    if total:
        keys = [key for key, n in sorted(counts.items()) if n]
        where = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        fate = (
            "they are left out of the margin (no distance can be measured)"
            if fine_filtering
            else "the coarse margin places them by their spatial index alone"
        )
        logger.warning(
            "%d row(s) have NaN/inf/null ra or dec (partitions %s): %s; pass check_input=True "
            "(CLI: --check-input) to count them over every row", total, where, fate,
        )
    return total


def _complete_earlier_run(plan: Plan, clock: runner.StageClock) -> MarginCacheResult:
    """Finish what a dead run with the same values left (its catalog is written) and report it."""
    from hats.catalog import TableProperties

    args, target = plan.args, plan.args.catalog_path
    with clock("finishing"):
        resume.finish_earlier_run(plan)
        properties = TableProperties.read_from_dir(target)
        lines = (target / "partition_info.csv").read_text().split()[1:]
        pixels = [tuple(int(x) for x in line.split(",")) for line in lines]
    result = MarginCacheResult(
        catalog_path=target,
        total_rows=int(properties.total_rows),
        pixels=pixels,
        margin_order=plan.margin_order,
        margin_threshold=plan.threshold_arcsec,
        fine_filtering=args.fine_filtering,
        stage_seconds=clock.seconds,
        skipped_tasks={"mapping": len(plan.map_tasks), "reducing": len(pixels)},
    )
    return result

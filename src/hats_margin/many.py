"""Several margins from one read of the catalog (``margin_threshold=[5, 10, 60]``).

Every margin is a run of its own for everything a run owns (its output directory, lock, claim,
staged overwrite, intermediate directory, fingerprint, done markers, finishing), exactly as a
single-threshold build; they share only the map stage. The map tasks are those of the largest
threshold: each partition is read once, its candidate rows are filtered at the largest threshold,
then at each smaller one (nested), and every destination gets its record batches in the task's
one shard (in the largest margin's intermediate directory), each row once with the margins it is
in. One reduce task per (margin, pixel); those of a pixel run one after another, largest
first, and the smaller ones keep their rows from the rows the largest read and sorted.

Order of the end, for resume: every margin's catalog is finished, the largest last; then each one's
intermediate files are removed and its claim released (or its staged overwrite swapped in), the
largest last, since its intermediate directory holds the shared shards. A killed run re-run with
the same arguments resumes each margin where it stopped; a changed set of thresholds or names is
refused (each fingerprint lists the run's margins).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from hats_margin import notify, resume, runner
from hats_margin.errors import OutputExistsError, StageFailedError
from hats_margin.orchestrator import (
    ManyMarginsResult,
    MarginCacheResult,
    _complete_earlier_run,
    _map_stage,
    _Prepared,
)
from hats_margin.prechecks import precheck

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from hats_margin.arguments import MarginCacheArguments

logger = logging.getLogger(__name__)


def pipeline_many(args: MarginCacheArguments, client: Client | None) -> ManyMarginsResult:
    """Plan every margin (no worker), map once, reduce and finish each; email the outcome once."""
    start = time.perf_counter()
    clock = runner.StageClock()
    try:
        prepared = _prepare_many(args, clock)
        try:
            with runner.client_for(args, client, clock) as run_client:
                results = _execute_many(prepared, run_client, clock)
        finally:
            for item in prepared:
                item.lock.release()
        from hats_margin import collection

        if collection.is_collection(args.input_catalog_path):
            for result in results:
                collection.register_margin(args.input_catalog_path, result.catalog_path)
    except Exception as exc:
        notify.send_completion_email(
            args, success=False, body=f"elapsed: {time.perf_counter() - start:.1f} s\n\nFailed with:\n\n{exc}"
        )
        raise
    outcome = ManyMarginsResult(results, stage_seconds=clock.seconds, elapsed_seconds=time.perf_counter() - start)
    logger.info("%s", outcome.summary())
    notify.send_completion_email(args, success=True, body=outcome.summary())
    return outcome


def _prepare_many(args: MarginCacheArguments, clock: runner.StageClock) -> list[_Prepared]:
    """Check every margin's output, plan them all from one opening of the input, and take every
    margin's output lock (released again if any margin is refused)."""
    with clock("planning"):
        for margin in args.margins:
            precheck(margin)
        from hats_margin.stages import planning

        prepared: list[_Prepared] = []
        with runner.progress("Planning", 1 + len(args.margins), args.progress_bar) as bar:
            plans = planning.make_plans(args)
            bar.update(1)
            try:
                for plan in plans:
                    planning.warn_on_large_margin(plan)
                    prepared.append(_Prepared(plan, resume.start(plan)))
                    bar.update(1)
            except BaseException:
                for item in prepared:
                    item.lock.release()
                raise
    lead = next(p for p in prepared if p.plan.margin_index == 0)
    unfinished = [p.plan.args.output_artifact_name for p in prepared if not p.start.complete]
    if lead.start.complete and unfinished:
        for item in prepared:
            item.lock.release()
        raise OutputExistsError(
            f"{lead.plan.args.catalog_path} (the largest threshold) was completed by an earlier run of these "
            f"margins, but {', '.join(unfinished)} not: its shared intermediate files are gone. Build "
            f"{', '.join(unfinished)} in a run without {lead.plan.args.output_artifact_name}"
        )
    return prepared


def _execute_many(
    prepared: list[_Prepared], client: Client, clock: runner.StageClock
) -> list[MarginCacheResult]:
    """Map once (the largest margin's tasks), reduce every unfinished margin, finish each (largest
    last), then clean up and publish each (largest last)."""
    from hats_margin.stages import finishing, planning, reducing

    lead = next(p for p in prepared if p.plan.margin_index == 0).plan
    args = lead.args
    todo_margins = [p for p in prepared if not p.start.complete]
    results: dict[str, MarginCacheResult] = {}
    for item in prepared:
        if item.start.complete:  # a dead run of the same margins had written it
            results[item.plan.args.output_artifact_name] = _complete_earlier_run(item.plan, clock)
    if todo_margins:
        hint = (
            "Fix the cause and run again with the same arguments to resume; work done so far is kept in "
            + ", ".join(str(p.plan.layout.base) for p in todo_margins)
            + "."
        )
        lead_start = next(p for p in prepared if p.plan.margin_index == 0).start
        with clock("mapping"):
            map_results, skipped_map = _map_stage(lead, lead_start, client, hint)
        reduce_tasks = {id(p): planning.make_reduce_tasks(p.plan, map_results) for p in todo_margins}
        with clock("reducing"):
            todo, skipped = [], 0
            for item in todo_margins:
                tasks = reduce_tasks[id(item)]
                done = item.start.done_reduces(tasks)
                for task in tasks:
                    if task.key in done:
                        skipped += 1
                    else:
                        todo.append(task)
            # the margins of one pixel side by side, largest first: one batch reads their rows once
            todo.sort(key=lambda t: (planning.spatial_order(t.pixel), t.margin))
            reduced = runner.run_stage(
                client, "Reducing", reducing.reduce_batch, todo, progress_bar=args.progress_bar,
                skipped=skipped, resume_hint=hint, batched=True, weight=reducing.weight,
            )
        ranked = sorted(todo_margins, key=lambda p: -p.plan.margin_index)  # the largest threshold last
        with clock("finishing"), runner.progress("Finishing", 2 * len(ranked), args.progress_bar) as bar:
            try:
                summaries = {}
                for item in ranked:
                    item.lock.set_phase("finishing")
                    tasks = reduce_tasks[id(item)]
                    footers = {t.pixel: reduced[t.key]["footer"] for t in tasks if t.key in reduced}
                    summaries[id(item)] = finishing.finish(
                        item.plan, {t.pixel: t.expected_rows for t in tasks}, footers
                    )
                    bar.update(1)
                for item in ranked:
                    finishing.clean_up(item.plan)
                    resume.publish(item.plan)
                    bar.update(1)
            except Exception as exc:
                raise StageFailedError("finishing", {"finishing": exc}, hint) from exc
        for item in todo_margins:
            plan, summary = item.plan, summaries[id(item)]
            results[plan.args.output_artifact_name] = MarginCacheResult(
                catalog_path=plan.args.catalog_path,
                total_rows=summary["total_rows"],
                pixels=summary["pixels"],
                margin_order=plan.margin_order,
                margin_threshold=plan.threshold_arcsec,
                fine_filtering=plan.args.fine_filtering,
                stage_seconds=clock.seconds,
                skipped_tasks={"mapping": skipped_map, "reducing": skipped},
            )
    return [results[p.plan.args.output_artifact_name] for p in prepared]

"""The margin cache pipeline: who does what.

- ``planning`` (driver): checks the input and output, resolves the margin order, and
  builds one small spec per source partition (its reachable destination pixels).
- ``mapping`` (workers, one task per source partition): streams the partition row group
  by row group and writes, per destination pixel, the rows that belong to its margin.
- ``reducing`` (workers, one task per margin pixel): merges its shards, sorted by the
  spatial index, into the final parquet file.
- ``finishing`` (driver): ``_metadata``, ``partition_info.csv``, ``hats.properties``
  (last), then removes the intermediate files.
- ``collection`` (driver): when the input is a HATS collection, the new margin is added to
  its ``collection.properties`` (``all_margins``, ``default_margin`` when unset).

``pipeline(args)`` owns a local Dask cluster; ``pipeline_with_client(args, client)``
borrows the caller's client. Every task is idempotent and leaves a done marker, so a
re-run with the same arguments resumes where a killed run stopped.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from distributed import Client, LocalCluster
from hats.catalog import TableProperties
from upath import UPath

from hats_margin import collection, notify, runner
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import ArgumentError, OutputExistsError, StageFailedError
from hats_margin.geometry import MAX_ORDER
from hats_margin.io import margin_write_kwargs, output_file, read_json, remove_tree
from hats_margin.resume import LOCK_NAME, OutputLock, fingerprint_digest, prepare_intermediate
from hats_margin.stages import finishing, mapping, planning, reducing

logger = logging.getLogger(__name__)

# names a hats-margin run may leave in its artifact directory before it succeeds
_OUR_NAMES = {
    "dataset",
    "intermediate",
    "partition_info.csv",
    "hats.properties",
    "properties",
    ".hats.properties.tmp",
    "margin_sky_map.png",
    LOCK_NAME,
}
# temporary file of an atomic lock rewrite cut short (io.write_json's naming)
_OUR_TEMP = re.compile(r"^\." + re.escape(LOCK_NAME) + r"\.\d+\.tmp$")
# returned by _prepare_output: a dead run with the same values had written the whole catalog
_COMPLETE = "complete"


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
    skipped_tasks: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        mode = "exact" if self.fine_filtering else "coarse"
        return (
            f"wrote {self.total_rows} margin rows in {len(self.pixels)} pixel file(s) to {self.catalog_path} "
            f"({mode}, threshold {self.margin_threshold:g} arcsec, margin order {self.margin_order}, "
            f"{sum(self.stage_seconds.values()):.1f} s)"
        )


def pipeline(args: MarginCacheArguments) -> MarginCacheResult:
    """Build the margin on a local Dask cluster made from the ``dask_*`` arguments."""
    with LocalCluster(
        n_workers=args.dask_n_workers,
        threads_per_worker=args.dask_threads_per_worker,
        local_directory=None if args.dask_tmp is None else str(args.dask_tmp),
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": ":0"},  # its HTTP server: any free port, no "8787 in use" warning
    ) as cluster, Client(cluster) as client:
        return pipeline_with_client(args, client)


def pipeline_with_client(args: MarginCacheArguments, client: Client) -> MarginCacheResult:
    """Build the margin with the caller's Dask client (local, remote scheduler, SLURM...)."""
    if not isinstance(args, MarginCacheArguments):
        raise ArgumentError(f"args must be MarginCacheArguments, not {type(args).__name__}")
    start = time.perf_counter()
    try:
        result = _run(args, client)
        if collection.is_collection(args.input_catalog_path):
            collection.register_margin(args.input_catalog_path, result.catalog_path)
    except Exception as exc:
        notify.send_completion_email(
            args, success=False, body=f"elapsed: {time.perf_counter() - start:.1f} s\n\nFailed with:\n\n{exc}"
        )
        raise
    notify.send_completion_email(
        args,
        success=True,
        body=(
            f"catalog: {result.catalog_path}\nrows written: {result.total_rows}\n"
            f"pixels written: {len(result.pixels)}\nelapsed: {time.perf_counter() - start:.1f} s"
        ),
    )
    return result


def _run(args: MarginCacheArguments, client: Client) -> MarginCacheResult:
    clock = runner.StageClock()
    with clock("planning"), runner.progress("Planning", 3, args.progress_bar) as bar:
        plan = planning.make_plan(args)
        bar.update(1)
        lock = OutputLock(args.catalog_path, plan.fingerprint)
        lock.acquire()
        try:
            resumed = _prepare_output(plan, lock)
        except BaseException:
            lock.release()
            raise
        bar.update(2)
    if resumed == _COMPLETE:
        try:
            return _complete_earlier_run(plan, clock)
        finally:
            lock.release()
    try:
        hint = (
            f"Fix the cause and run again with the same arguments to resume; work done so far is kept in "
            f"{plan.layout.base}."
        )
        with clock("mapping"):
            done = _done_keys(plan.layout.base / "mapping") if resumed else set()
            todo = [t for t in plan.map_tasks if t.key not in done]
            skipped_map = len(plan.map_tasks) - len(todo)
            results = runner.run_stage(
                client, "Mapping", mapping.map_partition, todo,
                progress_bar=args.progress_bar, skipped=skipped_map, resume_hint=hint,
            )
            for task in plan.map_tasks:
                if task.key not in results:
                    results[task.key] = read_json(plan.layout.map_marker(*task.source))
        reduce_tasks = _reduce_tasks(plan, results)
        with clock("reducing"):
            done = _done_keys(plan.layout.base / "reducing") if resumed else set()
            todo = [t for t in reduce_tasks if t.key not in done]
            runner.run_stage(
                client, "Reducing", reducing.reduce_pixel, todo,
                progress_bar=args.progress_bar, skipped=len(reduce_tasks) - len(todo), resume_hint=hint,
            )
        with clock("finishing"), runner.progress("Finishing", 2, args.progress_bar) as bar:
            try:
                lock.set_phase("finishing")
                summary = finishing.finish(plan, {t.pixel: t.expected_rows for t in reduce_tasks})
                bar.update(1)
                finishing.clean_up(plan)
            except Exception as exc:
                raise StageFailedError("finishing", {"finishing": exc}, hint) from exc
            bar.update(1)
    finally:
        lock.release()
    result = MarginCacheResult(
        catalog_path=args.catalog_path,
        total_rows=summary["total_rows"],
        pixels=summary["pixels"],
        margin_order=plan.margin_order,
        margin_threshold=plan.threshold_arcsec,
        fine_filtering=args.fine_filtering,
        stage_seconds=clock.seconds,
        skipped_tasks={"mapping": skipped_map, "reducing": len(reduce_tasks) - len(todo)},
    )
    logger.info("%s", result.summary())
    return result


def _prepare_output(plan, lock: OutputLock) -> bool | str:
    """Decide what to do with what is already at the output. Returns True when resuming, and
    _COMPLETE when a dead run with the same values had already written the whole catalog."""
    args, target = plan.args, plan.args.catalog_path
    names = set()
    for path in target.iterdir():
        if _OUR_TEMP.match(path.name):
            path.unlink(missing_ok=True)  # a lock write cut short by a crash
        else:
            names.add(path.name)
    if _is_valid_properties(target):
        if args.resume and _written_by_same_run(plan, lock):
            return _COMPLETE
        if not args.overwrite:
            raise OutputExistsError(
                f"{target} already contains a valid catalog; pass overwrite=True (CLI: --overwrite) to "
                "replace it, or choose another output_artifact_name"
            )
        _clear_artifact(target, names)
        names = {LOCK_NAME}
    foreign = sorted(names - _OUR_NAMES)
    if foreign:
        if not args.overwrite:
            raise OutputExistsError(
                f"{target} exists and holds files hats-margin did not write ({', '.join(foreign[:5])}); "
                "choose another output_artifact_name, or pass overwrite=True to replace its contents"
            )
        _clear_artifact(target, names)
    resumed = prepare_intermediate(plan.layout, plan.fingerprint, args.resume)
    if not resumed:
        for name in ("hats.properties", "properties", "dataset", "partition_info.csv"):
            path = target / name
            if path.exists():
                remove_tree(path) if path.is_dir() else path.unlink()
    return resumed


def _is_valid_properties(target: UPath) -> bool:
    try:
        TableProperties.read_from_dir(target)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _written_by_same_run(plan, lock: OutputLock) -> bool:
    """Was the valid catalog at the output written by a run with the same values that then died
    (before its clean-up ended)? Its run.json says so, or, once that is deleted, its stale lock."""
    recorded = read_json(plan.layout.run_file) or {}
    if recorded.get("fingerprint") == plan.fingerprint:
        return True
    previous = lock.taken_over or {}
    return previous.get("phase") == "finishing" and previous.get("fingerprint") == fingerprint_digest(
        plan.fingerprint
    )


def _complete_earlier_run(plan, clock) -> MarginCacheResult:
    """Finish what a dead run with the same values left: its catalog is written, only the copy of
    the properties and the clean-up of the intermediate files may be missing."""
    args, target = plan.args, plan.args.catalog_path
    logger.info("%s was fully written by an earlier run with the same values; finishing its clean-up", target)
    with clock("finishing"):
        if not (target / "properties").exists():
            (target / "properties").write_text((target / "hats.properties").read_text())
        if plan.layout.base.exists():
            prepare_intermediate(plan.layout, plan.fingerprint, resume=True)  # refuses what is not ours
            finishing.clean_up(plan)
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
    logger.info("%s", result.summary())
    return result


def _clear_artifact(target: UPath, names: set[str]):
    """Empty the artifact directory (ours to replace), keeping our lock. The properties go
    first: a clearing cut short never leaves a valid-looking catalog over missing files."""
    logger.info("overwrite=True: replacing the contents of %s", target)
    for name in sorted(names - {LOCK_NAME}, key=lambda n: n not in ("hats.properties", "properties")):
        path = target / name
        remove_tree(path) if path.is_dir() else path.unlink()


def _done_keys(directory: UPath) -> set[str]:
    if not directory.exists():
        return set()
    return {p.name[: -len(".json")] for p in directory.iterdir() if p.name.endswith(".json")}


def _reduce_tasks(plan, map_results: dict[str, dict]) -> list[reducing.ReduceTask]:
    args, catalog = plan.args, plan.catalog
    sources: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for payload in map_results.values():
        source = tuple(payload["source"])
        for key, n in payload["rows"].items():
            if n:
                dest = tuple(int(x) for x in key.split("_"))
                sources.setdefault(dest, []).append((*source, n))
    write_kwargs = margin_write_kwargs(catalog.schema, catalog.healpix_column, args.write_table_kwargs)
    tasks = []
    for dest, items in sources.items():
        items.sort(key=lambda s: s[1] << (2 * (MAX_ORDER - s[0])))
        tasks.append(
            reducing.ReduceTask(
                key=f"{dest[0]}_{dest[1]}",
                pixel=dest,
                sources=tuple((o, p) for o, p, _ in items),
                expected_rows=sum(n for *_, n in items),
                output_file=output_file(args.catalog_path, *dest, args.npix_suffix, args.npix_parquet_name),
                schema=catalog.schema,
                healpix_column=catalog.healpix_column,
                write_kwargs=write_kwargs,
                layout=plan.layout,
            )
        )
    tasks.sort(key=lambda t: -t.expected_rows)
    return tasks

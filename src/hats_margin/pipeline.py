"""The margin cache pipeline: who does what.

- ``planning`` (driver): checks the input and output, resolves the margin order, and
  builds one small spec per source partition (its reachable destination pixels).
- ``mapping`` (workers, one task per source partition): streams the partition row group
  by row group and writes, per destination pixel, the rows that belong to its margin.
- ``reducing`` (workers, one task per margin pixel): merges its shards, sorted by the
  spatial index, into the final parquet file.
- ``finishing`` (driver): ``_metadata``, ``partition_info.csv``, ``hats.properties``
  (last), then removes the intermediate files.

``pipeline(args)`` owns a local Dask cluster; ``pipeline_with_client(args, client)``
borrows the caller's client. Every task is idempotent and leaves a done marker, so a
re-run with the same arguments resumes where a killed run stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from distributed import Client, LocalCluster
from hats.catalog import TableProperties
from upath import UPath

from hats_margin import notify, runner
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import ArgumentError, OutputExistsError
from hats_margin.io import margin_write_kwargs, output_file, read_json, remove_tree
from hats_margin.resume import LOCK_NAME, OutputLock, prepare_intermediate
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
    ) as cluster, Client(cluster) as client:
        return pipeline_with_client(args, client)


def pipeline_with_client(args: MarginCacheArguments, client: Client) -> MarginCacheResult:
    """Build the margin with the caller's Dask client (local, remote scheduler, SLURM...)."""
    if not isinstance(args, MarginCacheArguments):
        raise ArgumentError(f"args must be MarginCacheArguments, not {type(args).__name__}")
    start = time.perf_counter()
    try:
        result = _run(args, client)
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
        lock = OutputLock(args.catalog_path)
        lock.acquire()
        try:
            resumed = _prepare_output(plan)
        except BaseException:
            lock.release()
            raise
        bar.update(2)
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
            summary = finishing.finish(plan, {t.pixel: t.expected_rows for t in reduce_tasks})
            bar.update(1)
            finishing.clean_up(plan)
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


def _prepare_output(plan) -> bool:
    """Decide what to do with what is already at the output. Returns True when resuming."""
    args, target = plan.args, plan.args.catalog_path
    names = {p.name for p in target.iterdir()}
    if _is_valid_properties(target):
        recorded = read_json(plan.layout.run_file) if args.resume else None
        unfinished = recorded is not None and recorded.get("fingerprint") == plan.fingerprint
        if not unfinished:
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
        for name in ("dataset", "partition_info.csv", "hats.properties", "properties"):
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


def _clear_artifact(target: UPath, names: set[str]):
    """Empty the artifact directory (ours to replace), keeping our lock."""
    logger.info("overwrite=True: replacing the contents of %s", target)
    for name in names - {LOCK_NAME}:
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
        items.sort(key=lambda s: s[1] << (2 * (29 - s[0])))
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

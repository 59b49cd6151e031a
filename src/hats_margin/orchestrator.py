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

Several thresholds (``margin_threshold=[5, 10, 60]``) go to ``many``: one run per margin for
everything a run owns, one shared map stage.

``pipeline(args)`` owns a local Dask cluster; ``pipeline_with_client(args, client)``
borrows the caller's client. Every task is idempotent and leaves a done marker (a map task's
JSON marker; a reduce task's margin file, published only when complete), so a re-run with the
same arguments resumes where a killed run stopped.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin import artifact, notify, runner
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import ArgumentError, OutputExistsError, StageFailedError
from hats_margin.geometry import MAX_ORDER
from hats_margin.io import read_json, remove_owned, remove_tree
from hats_margin.prechecks import exists_message, precheck
from hats_margin.resume import LOCK_NAME, OutputLock, fingerprint_digest, prepare_intermediate

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

# hats, the stages and dask.distributed are imported when first needed: a mistake in the
# arguments or the output location is reported before they load (about a second).

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
        return sum(m.total_rows for m in self.margins)

    def summary(self) -> str:
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

    plan: object
    lock: OutputLock
    resumed: bool | str


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


def _pipeline(args: MarginCacheArguments, client: Client | None) -> MarginCacheResult:
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
            if prepared.resumed == _COMPLETE:
                result = _complete_earlier_run(prepared.plan, clock)
            elif client is not None:
                result = _execute(prepared, client, clock)
            else:
                with runner.local_client(
                    args.dask_n_workers, args.dask_threads_per_worker, args.dask_tmp, clock
                ) as own_client:
                    result = _execute(prepared, own_client, clock)
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
            lock = OutputLock(args.catalog_path, plan.fingerprint)
            lock.acquire()
            try:
                resumed = _prepare_output(plan, lock)
            except BaseException:
                lock.release()
                raise
            bar.update(2)
    return _Prepared(plan, lock, resumed)


def _execute(prepared: _Prepared, client: Client, clock: runner.StageClock) -> MarginCacheResult:
    """Map, reduce and finish on the cluster (the lock is held by the caller)."""
    from hats_margin.stages import finishing, mapping, reducing

    plan, lock, resumed = prepared.plan, prepared.lock, prepared.resumed
    args = plan.args
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
        no_position = _warn_rows_without_coordinates(results, args.fine_filtering)
    reduce_tasks = _reduce_tasks(plan, results)
    with clock("reducing"):
        done = _published(plan.build_path, reduce_tasks) if resumed else set()
        todo = [t for t in reduce_tasks if t.key not in done]
        reduced = runner.run_stage(
            client, "Reducing", reducing.reduce_pixel, todo,
            progress_bar=args.progress_bar, skipped=len(reduce_tasks) - len(todo), resume_hint=hint,
        )
    with clock("finishing"), runner.progress("Finishing", 2, args.progress_bar) as bar:
        try:
            lock.set_phase("finishing")
            footers = {tuple(r["pixel"]): r["footer"] for r in reduced.values()}
            summary = finishing.finish(plan, {t.pixel: t.expected_rows for t in reduce_tasks}, footers)
            bar.update(1)
            finishing.clean_up(plan)
            _publish(plan)
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


def _prepare_output(plan, lock: OutputLock) -> bool | str:
    """Decide what to do with what is already at the output, and where to build (sets
    ``plan.build_path``). Returns True when resuming, and _COMPLETE when a dead run with the same
    values had already written the whole catalog.

    Without overwrite only a directory a run of ours claimed (artifact.claim) is cleared or
    resumed into. With overwrite, old contents (a valid catalog, files not ours) stay in place
    until the new catalog, built in a claimed staging directory, is complete (artifact.swap_in)."""
    args, target = plan.args, plan.args.catalog_path
    staging = target / artifact.STAGING_NAME
    current = fingerprint_digest(plan.fingerprint)
    for path in target.iterdir():
        if _OUR_TEMP.match(path.name):
            path.unlink(missing_ok=True)  # a lock write cut short by a crash
    finished = artifact.recover_swap(target)
    if finished and args.resume and finished.get("fingerprint") == current:
        return _COMPLETE
    staged = artifact.owner(staging)
    names = artifact.entries(target) - {artifact.OWNER_NAME} - ({artifact.STAGING_NAME} if staged else set())
    ours = artifact.owner(target) is not None and names <= _OUR_NAMES
    valid = _is_valid_properties(target)
    if valid or (names and not ours):
        if staged and args.resume and staged.get("fingerprint") == current and _is_valid_properties(staging):
            plan.build_path = staging
            return _COMPLETE
        if valid and not staged and args.resume and _written_by_same_run(plan, lock):
            return _COMPLETE
        if not args.overwrite:
            if valid:
                raise OutputExistsError(exists_message(target))
            foreign = sorted(names - _OUR_NAMES) or sorted(names)
            raise OutputExistsError(
                f"{target} exists and holds files hats-margin did not write ({', '.join(foreign[:5])}); "
                "choose another output_artifact_name, or pass overwrite=True to replace its contents"
            )
        logger.info("overwrite=True: the new catalog is built in %s; %s keeps its contents until it is complete",
                    staging, target)
        if not staged and staging.exists():
            remove_tree(staging)  # not claimed: not a build of ours, but inside the artifact directory
        plan.build_path = staging
    else:
        if staged:
            artifact.remove_claimed(staging)  # a replacement whose old contents are gone
        if artifact.owner(target) is None:
            artifact.claim(target, current)  # empty: ours from now on, before anything is written
    resumed = prepare_intermediate(plan.layout, plan.fingerprint, args.resume)
    if not resumed:
        for name in ("hats.properties", "properties", "partition_info.csv", "margin_sky_map.png"):
            path = plan.build_path / name
            if path.exists():
                remove_tree(path) if path.is_dir() else path.unlink()
        kept = remove_owned(plan.build_path / "dataset", _dataset_owns(args.npix_suffix, args.npix_parquet_name))
        if kept:  # at every depth, only what a run of ours writes there (issue 13 items 2 and 4)
            logger.warning("kept %d file(s) in %s that hats-margin did not write: %s",
                           len(kept), plan.build_path / "dataset", ", ".join(kept[:5]))
        artifact.claim(plan.build_path, current)
    elif plan.build_path == staging and not staged:
        artifact.claim(staging, current)
    return resumed


def _dataset_owns(npix_suffix: str, npix_parquet_name: str | None):
    """Whether a path below dataset/ is a name a run with this suffix writes: Norder=K/Dir=D/,
    the pixel files (and their hidden temporary names), _metadata and _common_metadata."""
    if npix_suffix in ("/", "\\"):
        inner = re.escape(npix_parquet_name) if npix_parquet_name else r"Npix=\d+\.parquet"
        leaf = r"Npix=\d+(/\.?" + inner + r"(\.tmp)?)?"
    else:
        leaf = r"\.?Npix=\d+" + re.escape(npix_suffix) + r"(\.tmp)?"
    pattern = re.compile(r"_metadata|_common_metadata|Norder=\d+(/Dir=\d+(/" + leaf + r")?)?")
    return lambda relative: pattern.fullmatch(relative) is not None


def _publish(plan):
    """The catalog is complete: swap it in if it was built beside old contents, else drop the claim."""
    target = plan.args.catalog_path
    if plan.build_path != target:
        artifact.swap_in(target, plan.build_path)
    else:
        artifact.release(target)


def _is_valid_properties(target: UPath) -> bool:
    """Whether ``target`` holds a properties file hats can read (hats is imported only when there
    is a properties file to judge)."""
    if not any((target / name).exists() for name in ("hats.properties", "properties")):
        return False
    from hats_margin.properties import plain_margin_is_valid

    if plain_margin_is_valid(target):  # a margin as we write it: no need to import hats (~1 s)
        return True
    from hats.catalog import TableProperties

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
    if (artifact.owner(plan.args.catalog_path) or {}).get("fingerprint") == fingerprint_digest(plan.fingerprint):
        return True  # the claim of a run with these values that had not yet released it
    previous = lock.taken_over or {}
    return previous.get("phase") == "finishing" and previous.get("fingerprint") == fingerprint_digest(
        plan.fingerprint
    )


def _complete_earlier_run(plan, clock) -> MarginCacheResult:
    """Finish what a dead run with the same values left: its catalog is written, only the copy of
    the properties and the clean-up of the intermediate files may be missing."""
    from hats.catalog import TableProperties

    from hats_margin.stages import finishing

    args, built, target = plan.args, plan.build_path, plan.args.catalog_path
    logger.info("%s was fully written by an earlier run with the same values; finishing its clean-up", built)
    with clock("finishing"):
        if not (built / "properties").exists():
            (built / "properties").write_text((built / "hats.properties").read_text())
        if plan.layout.base.exists():
            prepare_intermediate(plan.layout, plan.fingerprint, resume=True)  # refuses what is not ours
            finishing.clean_up(plan)
        _publish(plan)
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


def _done_keys(directory: UPath) -> set[str]:
    """Keys (file names without ``.json``) of the done markers in ``directory``; empty if it does not exist."""
    if not directory.exists():
        return set()
    return {p.name[: -len(".json")] for p in directory.iterdir() if p.name.endswith(".json")}


def _published(build_path: UPath, reduce_tasks: list) -> set[str]:
    """Keys of the reduce tasks whose margin file an earlier run published with the rows the map
    stage sent it: a file is renamed to its final name only when complete, so it is the task's done
    marker. One listing of the dataset directory, then the footers of the files found."""
    from concurrent.futures import ThreadPoolExecutor

    from hats_margin.io import file_key, listed_files, read_footer

    def rows(task) -> int | None:
        try:
            return read_footer(task.output_file).num_rows
        except (OSError, ValueError):  # unreadable (pyarrow's ArrowInvalid is a ValueError): redo it
            return None

    listed = listed_files(build_path / "dataset")
    found = [t for t in reduce_tasks if file_key(t.output_file) in listed]
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(rows, found))
    return {t.key for t, n in zip(found, counts) if n == t.expected_rows}


def _reduce_tasks(plan, map_results: dict[str, dict]) -> list:
    """One :class:`ReduceTask` per margin pixel that received rows, from the map tasks' markers
    (several margins: only this plan's, read from the shared shards).

    Each task's sources are sorted by spatial-index range, so its file comes out sorted; the
    tasks are returned largest first.
    """
    from hats_margin.io import margin_write_kwargs, output_file
    from hats_margin.stages import reducing

    args, catalog = plan.args, plan.catalog
    prefix = "" if plan.margin_index is None else f"{plan.margin_index}:"
    sources: dict[tuple[int, int], list[tuple[int, int, tuple[int, ...], int]]] = {}
    for payload in map_results.values():
        source = tuple(payload["source"])
        batches = payload.get("batches", {})
        for key, n in payload["rows"].items():
            if n and key.startswith(prefix) and (prefix or ":" not in key):
                dest = tuple(int(x) for x in key[len(prefix):].split("_"))
                sources.setdefault(dest, []).append((*source, tuple(batches[key]), n))
    write_kwargs = margin_write_kwargs(catalog.schema, catalog.healpix_column, args.write_table_kwargs)
    tasks = []
    for dest, items in sources.items():
        items.sort(key=lambda s: s[1] << (2 * (MAX_ORDER - s[0])))
        tasks.append(
            reducing.ReduceTask(
                key=f"{prefix}{dest[0]}_{dest[1]}",
                pixel=dest,
                sources=tuple((o, p, b) for o, p, b, _ in items),
                expected_rows=sum(n for *_, n in items),
                output_file=output_file(plan.build_path, *dest, args.npix_suffix, args.npix_parquet_name),
                schema=catalog.schema,
                healpix_column=catalog.healpix_column,
                write_kwargs=write_kwargs,
                layout=plan.layout,
                shard_layout=plan.shard_layout,
            )
        )
    tasks.sort(key=lambda t: -t.expected_rows)
    return tasks

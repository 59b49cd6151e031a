"""Which files at the output belong to a run, and how a run starts there: fresh, resuming earlier
work, or completing a catalog a dead run with the same values had already written.

Without overwrite only a directory a run of ours claimed (artifact.claim) is cleared or resumed
into. With overwrite, old contents (a valid catalog, files not ours) stay in place until the new
catalog, built in a claimed staging directory, is complete (artifact.swap_in, in :func:`publish`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin import artifact
from hats_margin.errors import OutputExistsError
from hats_margin.io import TempLayout, read_json, remove_owned, remove_tree
from hats_margin.lock import LOCK_NAME, OutputLock, fingerprint_digest
from hats_margin.prechecks import exists_message
from hats_margin.resume.done import done_maps, done_reduces
from hats_margin.resume.intermediate import prepare_intermediate

if TYPE_CHECKING:  # pragma: no cover
    from hats_margin.stages.planning import Plan
    from hats_margin.stages.reducing import ReduceTask

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

FRESH, RESUME, COMPLETE = "fresh", "resume", "complete"


@dataclass(frozen=True)
class Start:
    """How a run starts at its output, holding its output lock.

    ``kind`` is FRESH (nothing to keep), RESUME (the done markers of a killed run with the same
    values are kept) or COMPLETE (a dead run with the same values wrote the whole catalog: only
    :func:`finish_earlier_run` is left)."""

    kind: str
    lock: OutputLock
    layout: TempLayout
    build_path: UPath
    """Where the catalog is built (the artifact, or its staging directory under overwrite)."""

    @property
    def complete(self) -> bool:
        """A dead run with the same values had written the whole catalog."""
        return self.kind == COMPLETE

    def done_maps(self) -> dict[str, dict]:
        """The map tasks an earlier run finished, with their marker payloads (none unless resuming)."""
        return done_maps(self.layout) if self.kind == RESUME else {}

    def done_reduces(self, reduce_tasks: list[ReduceTask]) -> set[str]:
        """Keys of ``reduce_tasks`` an earlier run finished (none unless resuming)."""
        return done_reduces(self.build_path, reduce_tasks) if self.kind == RESUME else set()


def start(plan: Plan) -> Start:
    """Take the output lock and decide how the run starts (sets ``plan.build_path``). Returns
    holding the lock; releases it again when the output is refused."""
    lock = OutputLock(plan.args.catalog_path, plan.fingerprint)
    lock.acquire()
    try:
        kind = _prepare_output(plan, lock)
    except BaseException:
        lock.release()
        raise
    return Start(kind, lock, plan.layout, plan.build_path)


def _prepare_output(plan: Plan, lock: OutputLock) -> str:
    """Decide what to do with what is already at the output, and where to build (sets
    ``plan.build_path``); make the intermediate directory ready. Returns FRESH, RESUME or COMPLETE."""
    args, target = plan.args, plan.args.catalog_path
    staging = target / artifact.STAGING_NAME
    current = fingerprint_digest(plan.fingerprint)
    for path in target.iterdir():
        if _OUR_TEMP.match(path.name):
            path.unlink(missing_ok=True)  # a lock write cut short by a crash
    finished = artifact.recover_swap(target)
    if finished and args.resume and finished.get("fingerprint") == current:
        return COMPLETE
    staged = artifact.owner(staging)
    names = artifact.entries(target) - {artifact.OWNER_NAME} - ({artifact.STAGING_NAME} if staged else set())
    ours = artifact.owner(target) is not None and names <= _OUR_NAMES
    valid = is_valid_properties(target)
    if valid or (names and not ours):
        if staged and args.resume and staged.get("fingerprint") == current and is_valid_properties(staging):
            plan.build_path = staging
            return COMPLETE
        if valid and not staged and args.resume and _written_by_same_run(plan, lock):
            return COMPLETE
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
    return RESUME if resumed else FRESH


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


def publish(plan: Plan):
    """The catalog is complete: swap it in if it was built beside old contents, else drop the claim."""
    target = plan.args.catalog_path
    if plan.build_path != target:
        artifact.swap_in(target, plan.build_path)
    else:
        artifact.release(target)


def finish_earlier_run(plan: Plan):
    """Finish what a dead run with the same values left (a COMPLETE start): its catalog is written,
    only the copy of the properties, the clean-up of the intermediate files and the publishing may
    be missing."""
    from hats_margin.stages import finishing

    built = plan.build_path
    logger.info("%s was fully written by an earlier run with the same values; finishing its clean-up", built)
    if not (built / "properties").exists():
        (built / "properties").write_text((built / "hats.properties").read_text())
    if plan.layout.base.exists():
        prepare_intermediate(plan.layout, plan.fingerprint, resume=True)  # refuses what is not ours
        finishing.clean_up(plan)
    publish(plan)


def is_valid_properties(target: UPath) -> bool:
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


def _written_by_same_run(plan: Plan, lock: OutputLock) -> bool:
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

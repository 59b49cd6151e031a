"""Checks that need neither hats nor Dask, run first so that a mistake is reported in well under a second.

``precheck(args)`` looks at the input path, the output location and what the output already
holds; planning repeats the path checks with the resolved primary catalog and then does the
full input and resume checks. Nothing here writes or deletes.
"""

from __future__ import annotations

import os
from pathlib import Path

from upath import UPath

from hats_margin import artifact
from hats_margin.errors import ArgumentError, InputCatalogError, OutputExistsError
from hats_margin.io import TempLayout, as_upath, is_local, lists_partitions, path_relation
from hats_margin.lock import LOCK_NAME


def precheck(args) -> None:
    """Input exists and is a directory; the output location is usable; an output holding a
    catalog is refused when overwrite=False and no run of ours left it unfinished."""
    input_path = check_input_directory(args.input_catalog_path)
    check_output_directories(args)
    if not (input_path / "collection.properties").exists():  # a collection: planning checks its primary
        check_path_relations(args, input_path)
    target = args.catalog_path
    if args.overwrite or not looks_like_catalog(target):
        return
    traces = (LOCK_NAME, artifact.OWNER_NAME, artifact.STAGING_NAME, artifact.ASIDE_NAME)
    if any((target / name).exists() for name in traces) or TempLayout(args.tmp_base).run_file.exists():
        return  # perhaps our own unfinished run: decided once the plan gives its fingerprint
    raise OutputExistsError(exists_message(target))


def check_path_relations(args, input_path: UPath):
    """One relation check for every store (local, s3://, http://...), with and without overwrite:
    the artifact directory and the intermediate files are deleted or replaced, the input never."""
    for name, path, refused in (
        ("tmp_dir", args.tmp_base if args.tmp_dir is not None else None, ("same", "inside", "contains")),
        ("dask_tmp", args.dask_tmp, ("same", "inside")),  # workers' scratch: never deleted by us
    ):
        if path is not None and path_relation(path, input_path) in refused:
            raise ArgumentError(
                f"{name} {getattr(args, name)} overlaps the input catalog {input_path} (intermediate files in "
                f"{path}): hats-margin never writes into its input; choose a {name} outside it"
            )
    target = args.catalog_path
    relation = path_relation(target, input_path)
    if relation in ("same", "inside"):
        where = "the same directory as" if relation == "same" else "inside"
        raise ArgumentError(
            f"the output {target} (output_path/output_artifact_name) is {where} the input catalog "
            f"{input_path}; choose an output_path outside the input"
        )
    if relation == "contains":
        raise ArgumentError(
            f"the input catalog {input_path} is inside the output directory {target} "
            "(output_path/output_artifact_name); choose another output_artifact_name or output_path"
        )
    if args.tmp_dir is None and args.dask_tmp is not None and path_relation(args.tmp_base, input_path):
        raise ArgumentError(
            f"dask_tmp {args.dask_tmp} would put the intermediate files {args.tmp_base} in the input catalog "
            f"{input_path}; choose a tmp_dir outside it"
        )


def check_input_directory(path) -> UPath:
    """``path`` as a UPath, if it is an existing directory. Stores that cannot list (HTTP) cannot
    tell whether a directory exists: there the read of its properties says so."""
    path = as_upath(path)
    if not lists_partitions(path):
        return path
    if not path.exists():
        raise InputCatalogError(f"input_catalog_path {path} does not exist")
    if not path.is_dir():
        raise InputCatalogError(
            f"input_catalog_path {path} is not a directory: give the directory of a HATS catalog "
            "(the one holding hats.properties)"
        )
    return path


def check_output_directories(args) -> None:
    """output_path (a directory or nothing yet, writable), the artifact path (not a file), and
    tmp_dir / dask_tmp (writable)."""
    output = as_upath(args.output_path)
    if output.exists() and not output.is_dir():
        raise ArgumentError(f"output_path {output} is a file; it must be a directory (or not exist yet)")
    check_writable_directory("output_path", output)
    if args.catalog_path.exists() and not args.catalog_path.is_dir():
        raise ArgumentError(
            f"the output {args.catalog_path} (output_path/output_artifact_name) is a file; choose another "
            "output_artifact_name"
        )
    for name in ("tmp_dir", "dask_tmp"):
        if getattr(args, name) is not None:
            check_writable_directory(name, as_upath(getattr(args, name)))


def check_writable_directory(name: str, path: UPath):
    """A local directory we can create files in (or create): its nearest existing ancestor must be
    a writable directory. Checked before any work, as root too (a file in the way, a read-only mount)."""
    if not is_local(path):
        return
    existing = Path(path.path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ArgumentError(f"{name} {path} is not a writable directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(
            f"{name} {path} is not a writable directory: {existing} cannot be written "
            "(permissions or a read-only file system)"
        )


def plain_properties(directory: UPath) -> dict[str, str]:
    """The ``key=value`` lines of a catalog's ``hats.properties`` (else ``properties``), read
    without hats; {} when neither can be read."""
    for name in ("hats.properties", "properties"):
        try:
            text = (directory / name).read_text()
        except (OSError, UnicodeDecodeError):
            continue
        pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#"))
        return {key.strip(): value.strip() for key, value in pairs}
    return {}


def looks_like_catalog(target: UPath) -> bool:
    """A properties file naming a catalog type and name (hats itself is not loaded for this)."""
    return {"dataproduct_type", "obs_collection"} <= plain_properties(target).keys()


def exists_message(target) -> str:
    """The refusal for an output that holds a catalog."""
    return (
        f"{target} already contains a catalog; pass overwrite=True (CLI: --overwrite) to "
        "replace it, or choose another output_artifact_name"
    )

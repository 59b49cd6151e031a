"""The artifact directory: what a run may remove there, and replacing a catalog without losing it.

Ownership. A run that finds the artifact directory missing or empty *claims* it: it writes
``.hats-margin-owner`` (with its fingerprint digest) before anything else. Without
``overwrite`` only a claimed directory is ever cleared or resumed into; a directory that holds
anything and no claim (a user's files, a hats-import catalog, a catalog whose properties are
broken) is refused. The claim is removed when the catalog is complete.

Replacement (``overwrite=True`` over a valid catalog or over files that are not ours). The new
catalog is built in ``.hats-margin-new`` (a claimed staging directory inside the artifact
directory, where the lock is) while the old contents stay in place. Only when the new catalog
is complete does :func:`swap_in` exchange them:

1. claim ``.hats-margin-old`` and move the old entries into it (properties first),
   then record that the old contents are all aside;
2. move the new entries out of the staging directory (``hats.properties`` last);
3. delete the staging directory, then the old contents.

A run killed at any point of the swap leaves the new catalog whole in the staging directory plus
the artifact directory, and the old one whole in the artifact directory plus
``.hats-margin-old``; the next run calls :func:`recover_swap` first and completes the swap.
"""

from __future__ import annotations

import logging
import os
import re

from upath import UPath

from hats_margin.io import is_local, read_json, remove_file, remove_tree, write_json
from hats_margin.lock import LOCK_NAME

logger = logging.getLogger(__name__)

OWNER_NAME = ".hats-margin-owner"
STAGING_NAME = ".hats-margin-new"
ASIDE_NAME = ".hats-margin-old"
_ASIDE_DONE = ".hats-margin-aside-complete"
_LOCK_TEMP = re.compile(r"\." + re.escape(LOCK_NAME) + r"\.\d+\.tmp")
_TOOL = "hats-margin"


def is_lock_file(name: str) -> bool:
    """The output lock or the temporary file of a lock write (never part of a catalog)."""
    return name == LOCK_NAME or _LOCK_TEMP.fullmatch(name) is not None


def claim(directory: UPath, fingerprint_digest: str | None):
    """Record that a run of ours owns ``directory`` (and with which values it builds there)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / OWNER_NAME, {"tool": _TOOL, "fingerprint": fingerprint_digest})


def owner(directory: UPath) -> dict | None:
    """The claim a run of ours left in ``directory``, or None if it holds none."""
    record = read_json(directory / OWNER_NAME)
    return record if isinstance(record, dict) and record.get("tool") == _TOOL else None


def release(directory: UPath):
    """Remove the claim of a directory that now holds a complete catalog."""
    remove_file(directory / OWNER_NAME)


def entries(directory: UPath) -> set[str]:
    """Names in ``directory`` other than the lock (none if it does not exist)."""
    if not directory.exists():
        return set()
    return {p.name for p in directory.iterdir() if p.name and not is_lock_file(p.name)}


def swap_in(target: UPath, staging: UPath):
    """Replace the contents of ``target`` by the complete catalog in ``staging`` (see the module
    docstring). Idempotent: a call on a swap cut short carries it on from where it stopped."""
    aside = target / ASIDE_NAME
    if not (aside / _ASIDE_DONE).exists():
        if aside.exists() and owner(aside) is None:
            remove_tree(aside)  # not ours, but inside the artifact directory overwrite lets us replace
        claim(aside, None)
        release(target)  # a claim on the old contents: they are not ours to resume any more
        old = entries(target) - {OWNER_NAME, STAGING_NAME, ASIDE_NAME}
        for name in sorted(old, key=lambda n: (n not in ("hats.properties", "properties"), n)):
            _move(target / name, aside / name)
        write_json(aside / _ASIDE_DONE, {})
    new = entries(staging) - {OWNER_NAME}
    for name in sorted(new, key=lambda n: ({"properties": 1, "hats.properties": 2}.get(n, 0), n)):
        _move(staging / name, target / name)
    remove_claimed(staging)
    remove_claimed(aside)


def remove_claimed(directory: UPath):
    """Delete a directory of ours, its claim last: a deletion cut short leaves a claimed directory
    (or an empty one), never unclaimed leftovers that would look like someone else's files."""
    for name in entries(directory) - {OWNER_NAME}:
        path = directory / name
        remove_tree(path) if path.is_dir() else remove_file(path)
    remove_tree(directory)


def recover_swap(target: UPath) -> dict | None:
    """Complete a swap that a killed run left unfinished. Returns the claim of the staging
    directory whose catalog was put in place (its fingerprint digest), or None."""
    aside, staging = target / ASIDE_NAME, target / STAGING_NAME
    for directory in (aside, staging):
        if directory.exists() and not entries(directory):
            remove_tree(directory)  # the last step of a removal cut short
    if owner(aside) is None:
        return None
    record = owner(staging)
    if staging.exists():
        logger.warning("completing the replacement of the catalog in %s that a killed run had started", target)
        swap_in(target, staging)
        return record
    remove_claimed(aside)  # the new catalog is in place; only the old one was left to delete
    return None


def _move(source: UPath, destination: UPath):
    """Rename one entry (atomic on a local disk); on object stores file by file, each a copy then
    a delete, so that a move cut short is completed by moving what is left."""
    if is_local(source):
        os.rename(source.path, destination.path)
        return
    fs = source.fs
    if not fs.isdir(source.path):
        fs.mv(source.path, destination.path)
        return
    root, into = source.path.rstrip("/"), destination.path.rstrip("/")
    for file in fs.find(root):
        fs.mv(file, into + file[len(root):])
    if fs.exists(root):
        fs.rm(root, recursive=True)  # directory markers some stores keep

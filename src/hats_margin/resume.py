"""Resume safety: a fingerprint of everything that determines the output, and the output lock.

A run records its fingerprint in ``<intermediate>/run.json`` before any task runs. A later
run with ``resume=True`` continues only if every value matches; otherwise it refuses and
names the values that changed. ``resume=False`` deletes only this run's own intermediate
directory. The lock file ``<artifact>/.hats-margin.lock`` holds the owner's host and pid;
a lock whose process is dead (same host) is taken over; the lock also records the run's
fingerprint and phase, so the next run can tell that a dead run had finished writing its
catalog (and only its clean-up is left).

Invariant: while ``run.json`` exists, everything a done marker claims exists too. So
intermediate files are always discarded ``run.json`` first, and a directory without
``run.json`` is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from upath import UPath

from hats_margin.errors import OutputExistsError, OutputLockedError, ResumeMismatchError
from hats_margin.io import TempLayout, is_local, read_json, write_json

logger = logging.getLogger(__name__)

LOCK_NAME = ".hats-margin.lock"


def prepare_intermediate(layout: TempLayout, fingerprint: dict, resume: bool) -> bool:
    """Make the intermediate directory ready. Returns True when resuming earlier work."""
    recorded = read_json(layout.run_file)
    if recorded is None and layout.run_file.exists():
        recorded = {}  # unreadable run.json: ours, but nothing to resume from
    if recorded is not None and recorded.get("fingerprint", {}).get("output", fingerprint.get("output")) != (
        fingerprint.get("output")
    ):
        # tmp_dir/<name>/intermediate is shared by every output called <name>: never take another's
        raise OutputExistsError(
            f"the intermediate directory {layout.base} belongs to a run writing "
            f"{recorded['fingerprint']['output']}, not {fingerprint.get('output')}; use another tmp_dir, "
            "or delete that directory if that run is abandoned"
        )
    if recorded is None and layout.base.exists() and not _is_ours(layout):
        raise OutputExistsError(
            f"the intermediate directory {layout.base} exists and holds files hats-margin did not write; "
            "use another tmp_dir (or output_artifact_name), or empty that directory"
        )
    if recorded and resume:
        previous = recorded.get("fingerprint", {})
        changed = [
            f"{key} (was {previous.get(key)!r}, now {fingerprint.get(key)!r})"
            for key in sorted(set(previous) | set(fingerprint))
            if previous.get(key) != fingerprint.get(key)
        ]
        if changed:
            raise ResumeMismatchError(
                f"cannot resume from the intermediate files in {layout.base}: they were made with other "
                f"values: {'; '.join(changed)}. Re-run with the earlier values to resume, or pass "
                "resume=False (CLI: --no-resume) to discard them and start fresh."
            )
        layout.make_dirs()
        return True
    if layout.base.exists():
        logger.info("discarding intermediate files in %s (resume=False or no usable run.json)", layout.base)
        discard_intermediate(layout)
    layout.make_dirs()
    write_json(layout.run_file, {"fingerprint": fingerprint, "created": time.time()})
    return False


def discard_intermediate(layout: TempLayout):
    """Delete what a run wrote in the intermediate directory, run.json first: a deletion cut short
    leaves a directory that is never resumed (markers whose shards are gone), only discarded
    again. Files a run does not write are kept, at every depth (TempLayout.remove)."""
    kept = layout.remove()
    if kept:
        logger.warning(
            "kept %d file(s) in %s that hats-margin did not write: %s", len(kept), layout.base, ", ".join(kept[:5])
        )


_TEMP_JSON = re.compile(r"^\.run\.json\.\d+\.tmp$")


def _is_ours(layout: TempLayout) -> bool:
    """An intermediate directory without run.json is ours only if it holds nothing but our subdirs
    (and the temporary file of a run.json write cut short)."""
    names = {p.name for p in layout.base.iterdir()}
    return all(name in {"mapping", "reducing", "shards", "run.json"} or _TEMP_JSON.match(name) for name in names)


def digest(value) -> str:
    """Short stable hash of a JSON-able value (fingerprint fields, whole fingerprints)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_digest(fingerprint: dict | None) -> str | None:
    """The digest of a whole fingerprint, as stored in the lock and the artifact claim (None stays None)."""
    return None if fingerprint is None else digest(fingerprint)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Exclusive ownership of one output artifact directory for the duration of a run."""

    def __init__(self, catalog_path: UPath, fingerprint: dict | None = None):
        """A lock (not yet taken) on ``catalog_path``, naming this host, process and fingerprint."""
        self.path = catalog_path / LOCK_NAME
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "fingerprint": fingerprint_digest(fingerprint),
            "phase": "running",
        }
        self.held = False
        self.taken_over: dict | None = None
        """The stale lock of a dead run that this one replaced (its fingerprint and phase)."""

    def acquire(self):
        """Take the lock, replacing a stale one left by a dead process on this host.

        Raises :class:`OutputLockedError` if a live run (or this process) holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create():
                self.held = True
                return
            holder = read_json(self.path) or {}
            host, pid = holder.get("host"), holder.get("pid")
            if host == self.owner["host"] and isinstance(pid, int) and not _pid_alive(pid):
                logger.warning("taking over a stale lock %s of dead process %s", self.path, pid)
                self.taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            if host == self.owner["host"] and pid == self.owner["pid"]:
                raise OutputLockedError(f"{self.path.parent} is already being written by this process")
            raise OutputLockedError(
                f"another run (host {host}, pid {pid}) is writing {self.path.parent}; wait for it to end. "
                f"If that run is dead, delete {self.path} and try again."
            )
        raise OutputLockedError(f"could not take the lock {self.path}")

    def _create(self) -> bool:
        """Create the lock file with its content in one step; False if it already exists."""
        text = json.dumps(self.owner)
        if is_local(self.path):
            # the lock appears with its content (hard link of a written file): a crash can never
            # leave an empty lock that names no owner; io.write_json's temp naming
            tmp = f"{os.path.dirname(self.path.path)}/.{LOCK_NAME}.{os.getpid()}.tmp"
            with open(tmp, "w") as handle:
                handle.write(text)
            try:
                os.link(tmp, self.path.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
            finally:
                Path(tmp).unlink(missing_ok=True)
            return True
        if self.path.exists():
            return False
        write_json(self.path, self.owner)
        return True

    def set_phase(self, phase: str):
        """Record how far the run got, for the next run if this one dies (atomic rewrite)."""
        if self.held:
            self.owner["phase"] = phase
            write_json(self.path, self.owner)

    def release(self):
        """Delete the lock file if this run holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

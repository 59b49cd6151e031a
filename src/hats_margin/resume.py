"""Resume safety: a fingerprint of everything that determines the output, and the output lock.

A run records its fingerprint in ``<intermediate>/run.json`` before any task runs. A later
run with ``resume=True`` continues only if every value matches; otherwise it refuses and
names the values that changed. ``resume=False`` deletes only this run's own intermediate
directory. The lock file ``<artifact>/.hats-margin.lock`` holds the owner's host and pid;
a lock whose process is dead (same host) is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from upath import UPath

from hats_margin.errors import OutputLockedError, ResumeMismatchError
from hats_margin.io import TempLayout, is_local, read_json, remove_tree, write_json

logger = logging.getLogger(__name__)

LOCK_NAME = ".hats-margin.lock"


def prepare_intermediate(layout: TempLayout, fingerprint: dict, resume: bool) -> bool:
    """Make the intermediate directory ready. Returns True when resuming earlier work."""
    recorded = read_json(layout.run_file)
    if recorded is not None and resume:
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
    if recorded is not None or (layout.base.exists() and _is_ours(layout)):
        logger.info("discarding intermediate files in %s (resume=False)", layout.base)
        remove_tree(layout.base)
    layout.make_dirs()
    write_json(layout.run_file, {"fingerprint": fingerprint, "created": time.time()})
    return False


def _is_ours(layout: TempLayout) -> bool:
    """An intermediate directory without run.json is ours only if it holds nothing but our subdirs."""
    names = {p.name for p in layout.base.iterdir()}
    return names <= {"mapping", "reducing", "shards", "run.json"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Exclusive ownership of one output artifact directory for the duration of a run."""

    def __init__(self, catalog_path: UPath):
        self.path = catalog_path / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.held = False

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create():
                self.held = True
                return
            holder = read_json(self.path) or {}
            host, pid = holder.get("host"), holder.get("pid")
            if host == self.owner["host"] and isinstance(pid, int) and not _pid_alive(pid):
                logger.warning("taking over a stale lock %s of dead process %s", self.path, pid)
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
        text = json.dumps(self.owner)
        if is_local(self.path):
            try:
                fd = os.open(self.path.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            return True
        if self.path.exists():
            return False
        write_json(self.path, self.owner)
        return True

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

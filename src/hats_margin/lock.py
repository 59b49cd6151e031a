"""The output lock: one run at a time writes an output artifact directory.

The lock file ``<artifact>/.hats-margin.lock`` holds an owner record (host, pid, the run's
fingerprint digest, its phase) that the next run reads: a run that died after writing its
whole catalog is recognised by it (``OutputLock.taken_over``).

What makes the lock exclusive depends on the store:

- **local and shared file systems**: an operating-system lock (``fcntl.flock``) on the open
  lock file. The kernel releases it when its process dies, so a dead run's lock is simply
  locked again (its record stays readable): taking over a stale lock is as exclusive as
  taking a fresh one. A releasing run unlinks the file while it still holds it; a run that
  locked the unlinked file sees that the path names another file now and starts over.
  Where the file system refuses ``flock``, an exclusive create (hard link) is used and a
  dead run's lock must be deleted by hand.
- **object stores**: a conditional create (S3 ``PUT`` with ``If-None-Match: *``, through
  fsspec's ``mode="create"``); a dead run's lock (same host, dead pid) is replaced with a
  conditional ``PUT`` on its ETag (``If-Match``), so only one of several takers wins. A store
  without conditional writes only gets fsspec's check-then-write (see the README).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from upath import UPath

from hats_margin.errors import OutputLockedError
from hats_margin.io import is_local, read_json, write_json

logger = logging.getLogger(__name__)

LOCK_NAME = ".hats-margin.lock"


def fingerprint_digest(fingerprint: dict | None) -> str | None:
    """Short stable hash of a whole fingerprint (what the lock records)."""
    from hats_margin.resume import digest

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
        """The record of a dead run whose lock this one took (its fingerprint and phase)."""
        self._fd: int | None = None
        self._size = 0

    # ------------------------------------------------------------------ public
    def acquire(self):
        """Take the lock or raise OutputLockedError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_local(self.path):
            self._acquire_local()
        else:
            self._acquire_remote()
        self.held = True

    def set_phase(self, phase: str):
        """Record how far the run got, for the next run if this one dies."""
        if not self.held:
            return
        self.owner["phase"] = phase
        if self._fd is not None:
            self._write_record(self._fd)
        else:
            write_json(self.path, self.owner)

    def release(self):
        """Give the lock up and remove its file (a finished run leaves no record)."""
        if not self.held:
            return
        self.held = False
        if self._fd is not None:
            try:
                Path(self.path.path).unlink(missing_ok=True)  # while still locked: see the module docstring
            finally:
                os.close(self._fd)
                self._fd = None
        else:
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ local: flock
    def _acquire_local(self):
        """flock the lock file, checking that the file locked is still the one at the path; a dead
        run's record is kept as ``taken_over``."""
        import fcntl

        local = self.path.path
        for _ in range(100):
            fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise self._locked_error(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_without_flock()
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(local))
            except FileNotFoundError:
                same = False
            if not same:  # the file we locked was released (unlinked) meanwhile: lock the new one
                os.close(fd)
                continue
            try:
                self._claim(fd, _read_record(fd))
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return None
        raise OutputLockedError(f"could not take the lock {self.path}: it keeps being replaced by other runs")

    def _claim(self, fd: int, previous: dict | None):
        """We hold the OS lock: a record still in the file is a dead run's (a live one holds the
        lock). Refuse it only when it comes from another host, where flock may not reach."""
        if previous:
            host, pid = previous.get("host"), previous.get("pid")
            if host != self.owner["host"]:
                raise self._locked_error(previous)
            logger.warning("taking over a stale lock %s of dead process %s", self.path, pid)
            self.taken_over = previous
        self._size = os.fstat(fd).st_size
        self._write_record(fd)

    def _write_record(self, fd: int):
        """Rewrite the owner record in place in the open lock file."""
        # one write at offset 0, padded with spaces over any longer old record: a run killed at
        # any moment leaves either the old record or the new one, never a mix (JSON ignores spaces)
        data = json.dumps(self.owner).encode()
        data = data.ljust(self._size)
        os.pwrite(fd, data, 0)
        self._size = max(self._size, len(data))

    def _acquire_without_flock(self):
        """File systems without flock: exclusive create (a hard link of a written file, so the
        lock appears with its content). A dead run's lock is not taken over automatically."""
        local = self.path.path
        tmp = f"{os.path.dirname(local)}/.{LOCK_NAME}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            handle.write(json.dumps(self.owner))
        try:
            os.link(tmp, local)
        except FileExistsError:
            raise self._locked_error(read_json(self.path) or {}) from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    # ------------------------------------------------------------------ object stores
    def _acquire_remote(self):
        """Conditional create on the store (If-None-Match); a dead run's lock on this host is replaced
        only if unchanged since read (If-Match on its ETag)."""
        fs, key = self.path.fs, self.path.path
        text = json.dumps(self.owner).encode()
        try:
            fs.pipe_file(key, text, mode="create")  # S3: PUT If-None-Match: *
            return
        except FileExistsError:
            pass
        holder, etag = self._read_remote()
        host, pid = holder.get("host"), holder.get("pid")
        if not (host == self.owner["host"] and isinstance(pid, int) and not _pid_alive(pid)):
            raise self._locked_error(holder)
        if not etag:
            raise OutputLockedError(
                f"the lock {self.path} of dead process {pid} cannot be replaced safely on this store "
                "(it gives no ETag); delete it and try again"
            )
        try:
            # only the version judged stale is replaced: of several takers, one wins
            fs.pipe_file(key, text, IfMatch=etag)
        except OSError as exc:
            raise self._locked_error(self._read_remote()[0]) from exc
        logger.warning("taking over a stale lock %s of dead process %s", self.path, pid)
        self.taken_over = holder

    def _read_remote(self) -> tuple[dict, str | None]:
        """The lock's record and the ETag of that very version (one consistent read)."""
        fs, key = self.path.fs, self.path.path
        fs.invalidate_cache(key)
        try:
            with fs.open(key, "rb") as handle:
                etag = (getattr(handle, "details", None) or {}).get("ETag")
                raw = handle.read()
            record = json.loads(raw)
        except (OSError, ValueError):  # gone, replaced while read, or not JSON
            return {}, None
        return (record if isinstance(record, dict) else {}), etag

    # ------------------------------------------------------------------ messages
    def _locked_error(self, holder: dict | None) -> OutputLockedError:
        """The refusal naming the run that holds the lock."""
        holder = holder or {}
        host, pid = holder.get("host"), holder.get("pid")
        if host == self.owner["host"] and pid == self.owner["pid"]:
            return OutputLockedError(f"{self.path.parent} is already being written by this process")
        return OutputLockedError(
            f"another run (host {host}, pid {pid}) is writing {self.path.parent}; wait for it to end. "
            f"If that run is dead, delete {self.path} and try again."
        )


def _read_record(fd: int) -> dict | None:
    """The owner record in an open lock file ({} when unreadable, None when empty)."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, size, 0) if size else b""
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


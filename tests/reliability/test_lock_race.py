"""Issue 13 item 6: the local output lock is exclusive, also when several runs take over the
stale lock of a dead run at the same moment, and when one run releases as others arrive.

Several processes start each trial together (multiprocessing barriers) and try to take the
lock of one artifact directory; the test counts how many hold it at the same time.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys

import pytest
from lock_contender import contend
from upath import UPath

from hats_margin.resume import LOCK_NAME, OutputLock

CONTENDERS = 4
TRIALS = 40


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def race(target, prepare, trials: int = TRIALS, storage_options=None) -> list[list[int]]:
    """Run ``trials`` synchronised trials; returns, per trial, each contender's outcome
    (0 refused, 1 held, 3 held after taking over a stale lock, -1 unexpected error)."""
    context = multiprocessing.get_context("spawn")
    start, attempted, released = (context.Barrier(CONTENDERS + 1, timeout=120) for _ in range(3))
    results = context.Array("i", CONTENDERS)
    procs = [
        context.Process(
            target=contend,
            args=(str(target), trials, start, attempted, released, results, i, storage_options),
            daemon=True,
        )
        for i in range(CONTENDERS)
    ]
    for proc in procs:
        proc.start()
    outcomes = []
    try:
        for trial in range(trials):
            after_start = prepare(trial)
            start.wait()
            if after_start:
                after_start()
            attempted.wait()
            outcomes.append(list(results))
            attempted.wait()
            released.wait()
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return outcomes


def holders(outcome: list[int]) -> int:
    assert -1 not in outcome, outcome
    return sum(1 for x in outcome if x > 0)


def test_a_free_lock_has_exactly_one_holder_among_simultaneous_runs(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    outcomes = race(target, lambda trial: None)
    assert [holders(o) for o in outcomes] == [1] * TRIALS
    assert not (target / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_by_exactly_one_of_simultaneous_runs(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    pid = dead_pid()
    record = {"host": socket.gethostname(), "pid": pid, "started": 0, "fingerprint": "f", "phase": "finishing"}

    def stale_lock(trial):
        (target / LOCK_NAME).write_text(json.dumps(record))

    outcomes = race(target, stale_lock)
    assert [holders(o) for o in outcomes] == [1] * TRIALS
    # the one holder is the one that took the dead run's record over (resume relies on it)
    assert all(sorted(o) == [0] * (CONTENDERS - 1) + [3] for o in outcomes), outcomes


def test_a_lock_released_while_others_arrive_is_never_held_twice(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    holding = {}

    def held_by_us(trial):
        lock = OutputLock(UPath(target))
        lock.acquire()
        holding["lock"] = lock
        return lock.release

    outcomes = race(target, held_by_us)
    assert all(holders(o) <= 1 for o in outcomes), outcomes
    assert any(holders(o) == 1 for o in outcomes)


def test_the_record_of_a_dead_run_is_kept_for_resume(tmp_path):
    """The lock file of a killed run keeps its record: the next run reads its fingerprint and phase."""
    target = tmp_path / "artifact"
    target.mkdir()
    child = subprocess.run(
        [sys.executable, "-c",
         ("import os, sys; from upath import UPath; from hats_margin.resume import OutputLock;"
         f"lock = OutputLock(UPath({str(target)!r}), {{'a': 1}}); lock.acquire(); lock.set_phase('finishing');"
         "os._exit(0)")],
        check=True,
    )
    assert child.returncode == 0
    lock = OutputLock(UPath(target), {"a": 1})
    lock.acquire()
    try:
        assert lock.taken_over["phase"] == "finishing"
        assert lock.taken_over["fingerprint"] == lock.owner["fingerprint"]
        assert json.loads((target / LOCK_NAME).read_text())["pid"] == lock.owner["pid"]
    finally:
        lock.release()


@pytest.mark.parametrize("phase", ["running", "finishing-with-a-much-longer-phase-name"])
def test_set_phase_rewrites_the_record_in_place(tmp_path, phase):
    target = tmp_path / "artifact"
    lock = OutputLock(UPath(target))
    lock.acquire()
    try:
        inode = (target / LOCK_NAME).stat().st_ino
        lock.set_phase(phase)
        lock.set_phase("x")
        assert json.loads((target / LOCK_NAME).read_text())["phase"] == "x"
        assert (target / LOCK_NAME).stat().st_ino == inode, "a replaced file would not be the locked one"
    finally:
        lock.release()

"""Two runs, one output: the lock file names its owner's host and pid; a second run refuses while
the first is alive; the lock of a dead run is taken over."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import pytest
from harness import NAME, Run, assert_same_margin, finish, kill_group, spawn, tree_digest, wait_for

from hats_margin import OutputLockedError, StageFailedError, pipeline_with_client

LOCK = ".hats-margin.lock"


def test_second_run_refused_while_the_first_runs(client, baselines, source_copy, tmp_path):
    run = Run(source_copy, tmp_path / "out")
    log = tmp_path / "first.log"
    first = spawn(run, log, threads=True, sleep_at="after-lock=60")
    try:
        wait_for(first, lambda: "READY" in log.read_text())
        holder = json.loads((run.target / LOCK).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == first.pid
        before = tree_digest(run.target)
        with pytest.raises(OutputLockedError) as info:
            pipeline_with_client(run.args(), client)
        message = str(info.value)
        assert f"host {socket.gethostname()}, pid {first.pid}" in message and str(run.target) in message
        assert tree_digest(run.target) == before, "the refused run touched the first run's files"
        assert first.poll() is None
    finally:
        kill_group(first)
    # the first run is dead now: its lock is stale and taken over
    pipeline_with_client(run.args(), client)
    assert_same_margin(run.target, baselines(False))
    assert not (run.target / LOCK).exists()


@pytest.mark.slow
def test_second_run_refused_in_a_subprocess_too(client, source_copy, tmp_path):
    """The refusal also holds between two processes started the same way (CLI-like use)."""
    run = Run(source_copy, tmp_path / "out")
    first = spawn(run, tmp_path / "first.log", threads=True, sleep_at="after-lock=60")
    try:
        wait_for(first, lambda: "READY" in (tmp_path / "first.log").read_text())
        second_log = finish(spawn(run, tmp_path / "second.log", threads=True), timeout=120)
        assert "OutputLockedError" in second_log and f"pid {first.pid}" in second_log
        assert "RESULT" not in second_log
    finally:
        kill_group(first)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_process_is_taken_over(client, baselines, source_copy, tmp_path, caplog):
    run = Run(source_copy, tmp_path / "out")
    run.target.mkdir(parents=True)
    pid = dead_pid()
    (run.target / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 0}))
    caplog.set_level(logging.WARNING, logger="hats_margin")
    result = pipeline_with_client(run.args(), client)
    assert any("stale lock" in r.message and str(pid) in r.message for r in caplog.records)
    assert result.total_rows > 0 and not (run.target / LOCK).exists()
    assert_same_margin(run.target, baselines(False))


def test_lock_of_another_host_is_respected(client, source_copy, tmp_path):
    """A lock from another host cannot be checked for liveness: refuse, and say how to clear it."""
    run = Run(source_copy, tmp_path / "out")
    run.target.mkdir(parents=True)
    (run.target / LOCK).write_text(json.dumps({"host": "node-17.cluster", "pid": 4242, "started": 0}))
    with pytest.raises(OutputLockedError, match=r"host node-17\.cluster, pid 4242.*If that run is dead, delete"):
        pipeline_with_client(run.args(), client)
    assert json.loads((run.target / LOCK).read_text())["host"] == "node-17.cluster"
    assert sorted(p.name for p in run.target.iterdir()) == [LOCK]


def test_lock_is_released_after_a_failure(client, copy_catalog, tmp_path):
    source_copy = copy_catalog("small_sky_source_catalog")
    (source_copy / "dataset" / "Norder=2" / "Dir=0" / "Npix=180.parquet").write_bytes(b"garbage")
    run = Run(source_copy, tmp_path / "out")
    with pytest.raises(StageFailedError, match="2_180") as info:
        pipeline_with_client(run.args(), client)
    assert info.value.stage == "mapping" and list(info.value.failures) == ["2_180"]
    assert not (run.target / LOCK).exists()
    assert (tmp_path / "out" / NAME / "intermediate" / "run.json").exists()

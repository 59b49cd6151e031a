"""Kill at any moment, re-run, same result.

A subprocess builds the margin of the source fixture (threshold 3600 arcsec, so thousands of
margin rows) and is killed with SIGKILL, together with its Dask workers (the whole process
group), at one point of the run. Then the same arguments are run again (in this process, so
the stale lock of the dead run is taken over): the run must finish, skip exactly the tasks the
killed run had finished, and write the same rows in every pixel as an uninterrupted run; the
catalog passes ``is_valid_catalog(strict=True)``. Right after each kill, the output is checked
to be either not a valid catalog or already complete (never a half catalog).

Kill points are of three kinds:

* exact points inside the run (``run_margin.py --die-at``, the subprocess kills its own group
  there), covering planning, mapping, reducing and finishing, including half-written shards,
  half-written margin files, a half-renamed properties file and a half-done clean-up;
* points seen from outside, on the files a run writes (N map tasks listed in batch markers, the
  first reduce marker, partition_info.csv...), against a real LocalCluster with worker processes;
* random delays after the run has started.

Map tasks reach Dask in batches sharing one shard and one done marker: on the 2 threads of these
runs a batch is one task; the short version also kills runs on 1 thread (batches of 3), inside a
batch, and resumes them batched otherwise. The default run has a short version (7 kill points);
the sweep (``pytest -m slow
tests/reliability``) has 50 more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
from harness import (
    NAME,
    Run,
    assert_state_is_safe,
    exists,
    finish,
    kill_group,
    mapped_tasks_at_least,
    margin_files_at_least,
    random_delays,
    resume_and_check,
    snapshot,
    spawn,
    stage_of,
    wait_for,
)

N_MAP_TASKS = 14  # partitions of small_sky_source_catalog


def kill_and_resume(client, baselines, source, tmp_path, *, fine, tmp_dir, threads, die_at=None, condition=None,
                    delay=None, expect_stage=None, label=None, extra=None):
    run = Run(source, tmp_path / "out", fine, tmp_path / "tmp" if tmp_dir else None, extra=extra or {})
    baseline = baselines(fine)
    proc = spawn(run, tmp_path / "run.log", threads=threads, die_at=die_at)
    if die_at:
        finish(proc, killed=True)
    elif delay is not None:
        # a random moment once the run has started its work (the lock exists); a run that had
        # finished (released its lock) is no kill point: start over with half the delay
        for _ in range(6):
            wait_for(proc, exists(run.target / ".hats-margin.lock"))
            time.sleep(delay)
            kill_group(proc)
            finished = proc.returncode != -signal.SIGKILL or not (run.target / ".hats-margin.lock").exists()
            if not finished:
                break
            shutil.rmtree(run.output_path / NAME)
            delay /= 2
            proc = spawn(run, tmp_path / "run.log", threads=threads)
        assert not finished, "could not kill the run before it ended"
    else:
        wait_for(proc, condition)
        kill_group(proc)
        assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    state = snapshot(run)
    stage = stage_of(state)
    if expect_stage:
        assert stage == expect_stage, (state, proc.log_path.read_text()[-3000:])
    assert_state_is_safe(run, state, baseline)
    result = resume_and_check(client, run, state, baseline, N_MAP_TASKS)
    report = os.environ.get("HATS_MARGIN_KILL_REPORT")  # optional: one JSON line per kill point survived
    if report:
        point = label or die_at or f"delay {delay:.3f}s"
        with open(report, "a") as handle:
            handle.write(json.dumps({"point": point, "threads": threads, "fine": fine, "stage": stage,
                                     "state": state, "skipped": result.skipped_tasks,
                                     "rows": result.total_rows}) + "\n")
    return stage, state, result


# ----------------------------------------------------------------------------------- short version
@pytest.mark.parametrize(
    ("fine", "tmp_dir", "die_at", "stage"),
    [
        (False, False, "map-marker:5", "mapping"),  # 14 batches of one task (2 threads)
        (True, True, "reduce-write:3", "reducing"),
        (False, True, "mid-clean-up:4", "finishing"),
    ],
)
def test_kill_at_exact_point_then_resume(client, baselines, source_copy, sentinels, tmp_path, fine, tmp_dir,
                                         die_at, stage):
    kill_and_resume(client, baselines, source_copy, tmp_path, fine=fine, tmp_dir=tmp_dir, threads=True,
                    die_at=die_at, expect_stage=stage)


ONE_THREAD = {"dask_threads_per_worker": 1}
"""The killed run maps in batches of 3 tasks (14 tasks, 1 thread: 5 batches); the resume, on the
session client (2 threads), in batches of 1."""


@pytest.mark.parametrize(
    ("die_at", "mapped", "markers", "shards"),
    [
        ("map-shard:2", 0, 0, 1),  # the first batch's second task has written its rows: no marker yet
        ("map-shard-closed:2", 3, 1, 2),  # the second batch's shard is complete, its marker not written
        ("map-marker:2", 6, 2, 2),
    ],
)
def test_kill_inside_a_batch_of_map_tasks_then_resume_batched_otherwise(client, baselines, source_copy, sentinels,
                                                                      tmp_path, die_at, mapped, markers, shards):
    """A batch killed midway leaves no marker and is redone whole; the re-run, batching
    differently, skips exactly the tasks the markers list and writes the uninterrupted run's rows."""
    _, state, result = kill_and_resume(client, baselines, source_copy, tmp_path, fine=True, tmp_dir=False,
                                       threads=True, die_at=die_at, expect_stage="mapping", extra=ONE_THREAD)
    assert (state["mapped_tasks"], state["map_markers"], state["shards"]) == (mapped, markers, shards), state
    assert result.skipped_tasks["mapping"] == mapped


def test_kill_worker_processes_mid_mapping_then_resume(client, baselines, source_copy, sentinels, tmp_path):
    """A real LocalCluster (2 worker processes) killed as a group once 3 map tasks are done."""
    run = Run(source_copy, tmp_path / "out", True)
    _, state, _ = kill_and_resume(
        client, baselines, source_copy, tmp_path, fine=True, tmp_dir=False, threads=False,
        condition=mapped_tasks_at_least(run, 3),
    )
    assert state["mapped_tasks"] >= 3 and state["run_json"]


# ----------------------------------------------------------------------------------- the sweep
EXACT_POINTS = [
    ("after-plan", "planning"),
    ("after-lock", "planning"),
    ("after-run-json", "planning"),
    ("map-shard:1", "mapping"),
    ("map-shard:9", "mapping"),
    ("map-shard-closed:2", "mapping"),
    ("map-marker:1", "mapping"),
    ("map-marker:13", "mapping"),
    ("map-marker:14", "mapping"),
    ("reduce-write:1", "reducing"),
    ("reduce-close:1", "reducing"),
    ("reduce-publish:1", "reducing"),
    ("reduce-publish:12", "reducing"),
    ("after-metadata", "finishing"),
    ("after-properties-tmp", "finishing"),
    ("after-properties", "finishing"),
    ("mid-clean-up:1", "finishing"),
    ("mid-clean-up:20", "finishing"),
    ("after-clean-up", "finishing"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fine", [False, True], ids=["coarse", "exact"])
@pytest.mark.parametrize(("die_at", "stage"), EXACT_POINTS, ids=[p for p, _ in EXACT_POINTS])
def test_sweep_exact_points(client, baselines, source_copy, sentinels, tmp_path, die_at, stage, fine):
    kill_and_resume(client, baselines, source_copy, tmp_path, fine=fine, tmp_dir=fine, threads=True,
                    die_at=die_at, expect_stage=stage)


WATCHED = {
    "first-map-marker": lambda run: mapped_tasks_at_least(run, 1),
    "half-map-markers": lambda run: mapped_tasks_at_least(run, 7),
    "first-margin-file": lambda run: margin_files_at_least(run, 1),
    "half-margin-files": lambda run: margin_files_at_least(run, 7),
    "partition-info": lambda run: exists(run.target / "partition_info.csv"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fine", [False, True], ids=["coarse", "exact"])
@pytest.mark.parametrize("watch", list(WATCHED))
def test_sweep_watched_points_worker_processes(client, baselines, source_copy, sentinels, tmp_path, watch, fine):
    run = Run(source_copy, tmp_path / "out", fine, tmp_path / "tmp" if fine else None)
    kill_and_resume(client, baselines, source_copy, tmp_path, fine=fine, tmp_dir=fine, threads=False,
                    condition=WATCHED[watch](run), label=f"watched {watch}")


@pytest.mark.slow
@pytest.mark.parametrize("threads", [True, False], ids=["threads", "processes"])
@pytest.mark.parametrize("index", range(4))
def test_sweep_random_delays(client, baselines, source_copy, sentinels, tmp_path, index, threads):
    # the work after the lock takes ~0.5 s with threads, 5-15 s with fresh worker processes
    # (their start-up and imports); a delay past the end is halved until the kill lands in the run
    delay = random_delays(seed=20 + int(threads), n=4, high=1.0 if threads else 12.0)[index]
    kill_and_resume(client, baselines, source_copy, tmp_path, fine=bool(index % 2), tmp_dir=bool(index % 2),
                    threads=threads, delay=delay)


@pytest.mark.slow
def test_killed_twice_then_resumed(client, baselines, source_copy, sentinels, tmp_path):
    """Killed in mapping, the re-run killed again in reducing, then a third run finishes."""
    run = Run(source_copy, tmp_path / "out", True, tmp_path / "tmp")
    finish(spawn(run, tmp_path / "run1.log", threads=True, die_at="map-marker:4"), killed=True)
    first = snapshot(run)
    finish(spawn(run, tmp_path / "run2.log", threads=True, die_at="reduce-publish:3"), killed=True)
    second = snapshot(run)
    assert first["mapped_tasks"] == 4 and second["mapped_tasks"] == N_MAP_TASKS and second["margin_files"] == 3
    assert "done in an earlier run, skipped" in (tmp_path / "run2.log").read_text()
    resume_and_check(client, run, second, baselines(True), N_MAP_TASKS)

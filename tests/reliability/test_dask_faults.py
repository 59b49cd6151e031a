"""Dask faults: a worker process that dies mid-task does not fail the run; a task that raises is
reported once, and the run ends with one StageFailedError listing the failed keys and saying
how to resume; after the cause is fixed, the re-run resumes and completes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from distributed import Client, LocalCluster
from harness import NAME, Run, assert_same_margin, count
from hats.io.validation import is_valid_catalog

from hats_margin import StageFailedError, pipeline_with_client
from hats_margin.testing.synthetic import realistic_sky, write_hats_catalog


@pytest.fixture(scope="module")
def many_partitions(tmp_path_factory):
    """A synthetic catalog with ~40 small partitions: many short tasks, so both workers are always busy."""
    root = tmp_path_factory.mktemp("many_partitions")
    catalog = write_hats_catalog(
        realistic_sky(6_000, seed=7), root / "input", catalog_name="many", max_rows_per_partition=300,
        highest_order=6, row_group_size=100, write_table_kwargs={"compression": "snappy"},
    )
    return catalog


def reference(client, catalog, root):
    run = Run(catalog, root / "reference", fine_filtering=False, extra={"margin_threshold": 600.0})
    pipeline_with_client(run.args(), client)
    return run.target


def kill_busy_worker(client: Client, stage: str) -> int:
    """SIGKILL the process of a worker that is running a task of ``stage``; returns its pid."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [addr for addr, keys in client.processing().items() if any(f"-{stage}-" in str(k) for k in keys)]
        if busy:
            pids = client.run(os.getpid, workers=busy[:1])
            pid = pids[busy[0]]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.005)
    raise AssertionError(f"no worker was running a {stage} task")


def test_worker_killed_mid_task_does_not_fail_the_run(client, many_partitions, tmp_path):
    expected = reference(client, many_partitions, tmp_path)
    run = Run(many_partitions, tmp_path / "out", fine_filtering=False, extra={"margin_threshold": 600.0})
    n_partitions = sum(1 for _ in (many_partitions / "dataset").glob("Norder=*/Dir=*/*.parquet"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as fault_client, ThreadPoolExecutor(1) as pool:
        future = pool.submit(pipeline_with_client, run.args(), fault_client)
        # once the workers are warm and streaming map tasks, kill one that runs a map task
        deadline = time.monotonic() + 120
        while count(run.base / "mapping") < 3:
            assert time.monotonic() < deadline and not future.done(), "the run did not start mapping"
            time.sleep(0.005)
        killed_pid = kill_busy_worker(fault_client, "mapping")
        markers_at_kill = count(run.base / "mapping")
        result = future.result(timeout=300)
    assert markers_at_kill < n_partitions, "the worker was killed after mapping had ended"
    assert not psutil.pid_exists(killed_pid)
    assert result.skipped_tasks == {"mapping": 0, "reducing": 0}
    assert_same_margin(run.target, expected)


def corrupt(path):
    saved = path.with_name(path.name + ".saved")
    shutil.copyfile(path, saved)
    path.write_bytes(b"PAR1 this is not a parquet file")
    return saved


@pytest.mark.parametrize("n_bad", [1, 2])
def test_failing_task_is_reported_once_then_resumed(client, baselines, source_copy, tmp_path, caplog, n_bad):
    bad = [source_copy / "dataset" / "Norder=2" / "Dir=0" / f"Npix={p}.parquet" for p in (181, 185)[:n_bad]]
    keys = [f"2_{p}" for p in (181, 185)[:n_bad]]
    saved = [corrupt(path) for path in bad]
    run = Run(source_copy, tmp_path / "out", fine_filtering=False)
    caplog.set_level(logging.INFO, logger="hats_margin")  # per-task lines are INFO (CLI --verbose)
    with pytest.raises(StageFailedError) as info:
        pipeline_with_client(run.args(), client)
    error = info.value
    # one error, listing the failed keys, each with the file it could not read, and how to resume
    assert error.stage == "mapping" and sorted(error.failures) == keys
    message = str(error)
    assert f"{n_bad} mapping task(s) failed: {', '.join(keys)}" in message
    for key, path in zip(keys, bad):
        assert f"{key}: InputCatalogError: partition file {path} is not a readable parquet file" in message
    assert "run again with the same arguments to resume" in message and str(run.base) in message
    # each failure reported once by hats-margin's log
    for key in keys:
        reports = [r for r in caplog.records if r.name.startswith("hats_margin") and f"task {key} failed" in r.message]
        assert len(reports) == 1, [r.message for r in caplog.records]
    # never a half catalog
    assert not (run.target / "hats.properties").exists()
    assert not is_valid_catalog(str(run.target))
    assert count(run.base / "mapping") == 14 - n_bad
    # fix the cause, run again: the 14 - n_bad finished map tasks are not redone
    for path, copy in zip(bad, saved):
        shutil.move(copy, path)
    result = pipeline_with_client(run.args(), client)
    assert result.skipped_tasks == {"mapping": 14 - n_bad, "reducing": 0}
    assert_same_margin(run.target, baselines(False))
    assert not (tmp_path / "out" / NAME / "intermediate").exists()


def test_failure_in_finishing_is_one_stage_error_then_resumed(client, baselines, source_copy, tmp_path,
                                                              monkeypatch):
    """A driver-side failure (here: the disk is full while writing _metadata) ends as one
    StageFailedError with the resume hint; the re-run skips all tasks and completes."""
    import errno

    from hats_margin.stages import finishing

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finishing, "write_metadata_files", full_disk)
    run = Run(source_copy, tmp_path / "out", fine_filtering=False)
    with pytest.raises(StageFailedError) as info:
        pipeline_with_client(run.args(), client)
    assert info.value.stage == "finishing"
    assert "No space left on device" in str(info.value) and "to resume" in str(info.value)
    assert not is_valid_catalog(str(run.target))
    monkeypatch.undo()
    result = pipeline_with_client(run.args(), client)
    assert result.skipped_tasks == {"mapping": 14, "reducing": len(result.pixels)}
    assert_same_margin(run.target, baselines(False))


"""A full disk during the run fails cleanly (one StageFailedError naming the OSError, no
catalog), and the same run resumes once there is space again.

With a small tmpfs when this machine lets us mount one (root in a container usually can; the
test skips otherwise), and always with a simulated full disk (a writer that raises ENOSPC).
"""

from __future__ import annotations

import errno
import subprocess

import pytest
from harness import Run, assert_same_margin, count
from hats.io.validation import is_valid_catalog

from hats_margin import StageFailedError, pipeline_with_client
from hats_margin import io as hm_io


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 128 KiB tmpfs; yields (path, grow) where grow() makes it 64 MiB (contents kept)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount_point)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the simulated full disk covers it")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def assert_failed_cleanly(error: StageFailedError, run: Run, stage: str):
    assert error.stage == stage, str(error)
    # every failed task failed on the full disk, and the message names that OSError (type and
    # errno) for each task it lists, then where the work done so far is kept
    message = str(error)
    assert error.failures, message
    for key, exc in error.failures.items():
        assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, (key, repr(exc))
    keys = sorted(error.failures)
    # one line: the count, the first keys, the first task's error (the rest with --verbose)
    assert "\n" not in message, message
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    assert message.startswith(f"{len(keys)} {stage} task(s) failed: {shown}. "), message
    assert f"{keys[0]}: OSError: [Errno 28] " in message, message
    assert "run again with the same arguments to resume" in message
    assert f"kept in {run.base}" in message, message
    assert not (run.target / "hats.properties").exists()
    assert not is_valid_catalog(str(run.target))


@pytest.mark.parametrize("fine", [False, True], ids=["coarse", "exact"])
def test_intermediate_files_fill_a_small_disk(client, baselines, source_copy, tmp_path, small_tmpfs, fine):
    disk, grow = small_tmpfs
    run = Run(source_copy, tmp_path / "out", fine, tmp_dir=disk)
    with pytest.raises(StageFailedError) as info:
        pipeline_with_client(run.args(), client)
    assert_failed_cleanly(info.value, run, "mapping")
    done_before = count(run.base / "mapping")
    grow()
    result = pipeline_with_client(run.args(), client)
    assert result.skipped_tasks["mapping"] == done_before
    assert_same_margin(run.target, baselines(fine))
    assert not (disk / "margin").exists()


def test_margin_files_fill_a_small_disk(client, baselines, source_copy, tmp_path, small_tmpfs):
    disk, grow = small_tmpfs
    run = Run(source_copy, disk / "out", False, tmp_dir=tmp_path / "tmp")
    with pytest.raises(StageFailedError) as info:
        pipeline_with_client(run.args(), client)
    assert_failed_cleanly(info.value, run, "reducing")
    grow()
    result = pipeline_with_client(run.args(), client)
    assert result.skipped_tasks["mapping"] == 14
    assert_same_margin(run.target, baselines(False))


def test_simulated_full_disk_while_writing_shards(client, baselines, source_copy, tmp_path, monkeypatch):
    """Whatever the machine: the shard writer raises ENOSPC after a few writes."""
    real_write = hm_io.ShardWriters.write
    calls = {"n": 0}

    def write(self, dest, table, *rest):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, dest, table, *rest)

    monkeypatch.setattr(hm_io.ShardWriters, "write", write)
    run = Run(source_copy, tmp_path / "out", False)
    with pytest.raises(StageFailedError) as info:
        pipeline_with_client(run.args(), client)
    assert_failed_cleanly(info.value, run, "mapping")
    monkeypatch.undo()
    result = pipeline_with_client(run.args(), client)
    assert 0 < result.skipped_tasks["mapping"] < 14
    assert_same_margin(run.target, baselines(False))

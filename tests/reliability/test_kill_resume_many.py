"""Several margins from one read, killed at any moment, re-run: every margin is the one a build
with its threshold alone writes.

The run's shards hold each row once with the margins it is in, in the largest margin's
intermediate directory, and its margins are reduced one after another per pixel: a subprocess
builds two margins of the source fixture (600 and 3600 arcsec, thousands of rows) and is killed
with SIGKILL, with its process group, at an exact point (mid-shard, after a batch's marker,
mid-reduce of either margin, mid-finishing, mid-clean-up) or after a random delay. Right after
the kill, neither output may look like a valid catalog unless it is complete; the same arguments
run again in this process must finish both, each equal to its single build, and leave no
intermediate files.
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest
from harness import Run, assert_same_margin, exists, finish, kill_group, random_delays, spawn, wait_for
from hats.io.validation import is_valid_catalog

from hats_margin import pipeline_with_client

THRESHOLDS = [3600.0, 600.0]
NAMES = ["many_3600", "many_600"]


@pytest.fixture(scope="module")
def singles(tmp_path_factory, client):
    """Each margin built alone (the reference)."""
    out = tmp_path_factory.mktemp("singles")
    from harness import SOURCE

    for threshold, name in zip(THRESHOLDS, NAMES):
        run = Run(SOURCE, out, True, extra={"margin_threshold": threshold, "output_artifact_name": name})
        pipeline_with_client(run.args(), client)
    return out


def _kill_and_resume(client, singles, source, tmp_path, *, die_at=None, delay=None, tmp_dir=False):
    run = Run(source, tmp_path / "out", True, tmp_path / "tmp" if tmp_dir else None,
              extra={"margin_threshold": THRESHOLDS, "output_artifact_name": NAMES})
    proc = spawn(run, tmp_path / "run.log", threads=True, die_at=die_at)
    if delay is not None:
        # a random moment once the run has started its work (its first margin's lock exists); a
        # run that had finished (released its locks) is no kill point: start over with half the delay
        lock = run.output_path / NAMES[0] / ".hats-margin.lock"
        for _ in range(6):
            wait_for(proc, exists(lock))
            time.sleep(delay)
            kill_group(proc)
            finished = proc.returncode != -signal.SIGKILL or not lock.exists()
            if not finished:
                break
            for name in NAMES:
                shutil.rmtree(run.output_path / name, ignore_errors=True)
            delay /= 2
            proc = spawn(run, tmp_path / "run.log", threads=True)
        assert not finished, "could not kill the run before it ended"
        finish(proc)
    else:
        finish(proc, killed=True)
    for name in NAMES:  # never a half catalog
        if is_valid_catalog(str(run.output_path / name)):
            assert (run.output_path / name / "hats.properties").exists()
            assert_same_margin(run.output_path / name, singles / name)
    result = pipeline_with_client(run.args(), client)
    assert [m.catalog_path.name for m in result.margins] == NAMES
    for name, margin in zip(NAMES, result.margins):
        assert margin.total_rows == assert_same_margin(run.output_path / name, singles / name)
        assert not (run.output_path / name / "intermediate").exists()
    if tmp_dir:
        assert not any((tmp_path / "tmp").glob("many_*"))


@pytest.mark.slow
@pytest.mark.parametrize("die_at", [
    "map-shard:3", "map-marker:5", "reduce-close:2", "reduce-publish:4", "reduce-publish:19",
    "after-metadata", "after-properties:1", "mid-clean-up:3",
])
def test_several_margins_killed_at_a_point_resume_to_the_single_builds(client, singles, source_copy, tmp_path, die_at):
    _kill_and_resume(client, singles, source_copy, tmp_path, die_at=die_at, tmp_dir=die_at.startswith("reduce"))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3))
def test_several_margins_killed_at_random_resume_to_the_single_builds(client, singles, source_copy, tmp_path, index):
    delay = random_delays(seed=40, n=3, high=1.5)[index]
    _kill_and_resume(client, singles, source_copy, tmp_path, delay=delay)

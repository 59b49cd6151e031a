"""Helpers of the reliability suite (its fixtures are re-exported by conftest.py): run the pipeline in a killable subprocess, watch its files,
kill its whole process group, and compare a margin with an uninterrupted run's.

The subprocess is ``run_margin.py`` (beside this file). It runs in its own session
(``start_new_session=True``) so that ``os.killpg`` kills it together with its Dask workers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.io.validation import is_valid_catalog

from hats_margin import MarginCacheArguments, pipeline_with_client
from helpers import tree_checksum

RUNNER = Path(__file__).with_name("run_margin.py")
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "catalogs"
SOURCE = FIXTURES / "small_sky_source_catalog"
NAME = "margin"
THRESHOLD = 3600.0

# hats' tree alignment is numba-compiled on first use (~7 s per fresh process, uncached);
# the kill subprocesses skip the compilation: same results, only the planning speed differs.
SUBPROCESS_ENV = {"NUMBA_DISABLE_JIT": "1", "PYTHONUNBUFFERED": "1"}


tree_digest = tree_checksum


# ------------------------------------------------------------------------------ margin content
def margin_tables(catalog: Path) -> dict[tuple[int, int], pa.Table]:
    """(order, pixel) -> that pixel's rows, sorted by every column (an order-insensitive key)."""
    tables = {}
    for leaf in sorted(Path(catalog, "dataset").glob("Norder=*/Dir=*/Npix=*")):
        order = int(leaf.parts[-3].split("=")[1])
        pixel = int(leaf.name.split("=")[1].split(".")[0])
        files = sorted(leaf.glob("*.parquet")) if leaf.is_dir() else [leaf]
        table = pa.concat_tables([pq.read_table(f) for f in files])
        table = table.replace_schema_metadata(None)
        tables[(order, pixel)] = table.sort_by([(name, "ascending") for name in table.column_names])
    return tables


def assert_same_margin(catalog: Path, baseline: Path):
    """Same pixels, and per pixel exactly the same rows (as multisets); the catalog passes
    hats' strict validation. Returns the number of rows compared."""
    got, want = margin_tables(catalog), margin_tables(baseline)
    assert sorted(got) == sorted(want), f"pixels differ: {sorted(set(got) ^ set(want))}"
    for pixel, table in want.items():
        assert got[pixel].num_rows == table.num_rows, f"pixel {pixel}: {got[pixel].num_rows} rows, want {table.num_rows}"
        assert got[pixel].equals(table), f"pixel {pixel}: rows differ"
    assert is_valid_catalog(str(catalog), strict=True)
    return sum(t.num_rows for t in want.values())


# ------------------------------------------------------------------------------ run description
@dataclass
class Run:
    """One margin build: its arguments and where its files go."""

    input_path: Path
    output_path: Path
    fine_filtering: bool = False
    tmp_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    def kwargs(self, **overrides) -> dict:
        values = {
            "input_catalog_path": str(self.input_path),
            "output_path": str(self.output_path),
            "output_artifact_name": NAME,
            "margin_threshold": THRESHOLD,
            "fine_filtering": self.fine_filtering,
            "progress_bar": False,
            "dask_n_workers": 2,
            "dask_threads_per_worker": 2,
        }
        if self.tmp_dir is not None:
            values["tmp_dir"] = str(self.tmp_dir)
        values.update(self.extra)
        values.update(overrides)
        return values

    def args(self, **overrides) -> MarginCacheArguments:
        return MarginCacheArguments(**self.kwargs(**overrides))

    @property
    def target(self) -> Path:
        return self.output_path / NAME

    @property
    def base(self) -> Path:
        """The intermediate directory."""
        return (self.tmp_dir / NAME if self.tmp_dir else self.target) / "intermediate"


# ------------------------------------------------------------------------------ subprocess control
def spawn(run: Run, log: Path, *, threads: bool, die_at: str | None = None, sleep_at: str | None = None):
    command = [sys.executable, str(RUNNER), json.dumps(run.kwargs())]
    if threads:
        command.append("--threads")
    if die_at:
        command += ["--die-at", die_at]
    if sleep_at:
        command += ["--sleep-at", sleep_at]
    handle = open(log, "ab")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **SUBPROCESS_ENV}, cwd=str(log.parent),
    )
    proc.log_handle = handle
    proc.log_path = log
    return proc


def group_members(session_id: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == session_id and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def kill_group(proc) -> None:
    """SIGKILL the subprocess and everything in its session (its Dask scheduler and workers);
    wait until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_members(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed run survive: {group_members(proc.pid)}"
        for member in group_members(proc.pid):
            try:
                member.kill()
            except psutil.Error:
                pass
        time.sleep(0.05)
    proc.log_handle.close()


def wait_for(proc, condition, timeout: float = 300.0, poll: float = 0.003) -> bool:
    """Poll until condition() holds (True) or the process ends by itself (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            if condition():
                return True
            raise AssertionError(f"the run ended before the kill condition; log: {proc.log_path.read_text()[-3000:]}")
        time.sleep(poll)
    kill_group(proc)
    raise AssertionError(f"timed out waiting for a kill condition; log: {proc.log_path.read_text()[-3000:]}")


def finish(proc, timeout: float = 300.0, *, killed: bool = False) -> str:
    """Wait for the subprocess to end by itself; its log. ``killed``: it must have died by
    SIGKILL (a --die-at point), not exited (an error in the instrumentation would look alike)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    kill_group(proc)  # reap any worker left behind
    log = proc.log_path.read_text()
    if killed:
        assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}, not killed:\n{log[-3000:]}"
    return log


# ------------------------------------------------------------------------------ kill conditions
def count(directory: Path, pattern: str = "*.json") -> int:
    try:
        return sum(1 for _ in directory.glob(pattern))
    except OSError:
        return 0


def mapped_tasks(run: Run) -> int:
    """Map tasks listed in the done markers of their batches (a marker cut short lists none)."""
    n = 0
    for marker in sorted((run.base / "mapping").glob("*.json")) if (run.base / "mapping").exists() else []:
        try:
            n += len(json.loads(marker.read_text())["tasks"])
        except (OSError, ValueError, KeyError):
            continue
    return n


def mapped_tasks_at_least(run: Run, n: int):
    """At least n map tasks done (listed in their batches' markers)."""
    return lambda: mapped_tasks(run) >= n


def margin_files_at_least(run: Run, n: int):
    """n margin files published (a reduce task's file is its done marker)."""
    return lambda: count(run.target / "dataset", "Norder=*/Dir=*/Npix=*") >= n


def exists(path: Path):
    return lambda: path.exists()


# ------------------------------------------------------------------------------ state at the kill
def snapshot(run: Run) -> dict:
    """What a killed run left behind."""
    target = run.target
    return {
        "lock": (target / ".hats-margin.lock").exists(),
        "run_json": (run.base / "run.json").exists(),
        "map_markers": count(run.base / "mapping"),  # one per batch of map tasks
        "mapped_tasks": mapped_tasks(run),
        "shards": count(run.base / "shards", "*.arrow"),
        "margin_files": count(target / "dataset", "Norder=*/Dir=*/Npix=*"),
        # a margin file being written (published under its final name only when complete)
        "margin_temps": count(target / "dataset", "Norder=*/Dir=*/.Npix=*.tmp"),
        "metadata": (target / "dataset" / "_metadata").exists(),
        "partition_info": (target / "partition_info.csv").exists(),
        "properties_tmp": (target / ".hats.properties.tmp").exists(),
        "hats_properties": (target / "hats.properties").exists(),
        "intermediate": run.base.exists(),
    }


def stage_of(state: dict) -> str:
    if state["hats_properties"] or state["properties_tmp"] or state["partition_info"] or state["metadata"]:
        return "finishing"
    if state["margin_files"] or state["margin_temps"]:
        return "reducing"
    if state["map_markers"] or state["shards"]:
        return "mapping"
    return "planning"


def assert_state_is_safe(run: Run, state: dict, baseline: Path):
    """Never a half catalog: a killed run's output is either not a valid catalog, or complete."""
    if is_valid_catalog(str(run.target)):
        assert state["hats_properties"]
        assert_same_margin(run.target, baseline)


def resume_and_check(client, run: Run, state: dict, baseline: Path, n_map_tasks: int):
    """Re-run with the same arguments in this process; it must finish with the uninterrupted
    run's rows, skip exactly the work the killed run had finished, and leave nothing behind."""
    result = pipeline_with_client(run.args(), client)
    rows = assert_same_margin(run.target, baseline)
    assert result.total_rows == rows
    complete = state["hats_properties"] and (state["run_json"] or state["lock"])
    if complete:
        assert result.skipped_tasks["mapping"] == n_map_tasks
    elif state["run_json"]:
        assert result.skipped_tasks["mapping"] == state["mapped_tasks"], (result.skipped_tasks, state)
        # a published margin file is its reduce task's done marker
        assert result.skipped_tasks["reducing"] == state["margin_files"], (result.skipped_tasks, state)
    else:
        assert result.skipped_tasks == {"mapping": 0, "reducing": 0}, (result.skipped_tasks, state)
    assert not run.base.exists(), "the intermediate files must be removed after success"
    if run.tmp_dir is not None:
        assert not (run.tmp_dir / NAME).exists()
    leftovers = {p.name for p in run.target.iterdir()} - {"dataset", "partition_info.csv", "hats.properties",
                                                          "properties"}
    assert not leftovers, f"files left in the catalog: {leftovers}"
    return result


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def baselines(tmp_path_factory, client):
    """Uninterrupted margins of the source fixture (computed once per fine_filtering value)."""
    cache: dict[bool, Path] = {}

    def get(fine_filtering: bool) -> Path:
        if fine_filtering not in cache:
            run = Run(SOURCE, tmp_path_factory.mktemp(f"baseline_{fine_filtering}"), fine_filtering)
            pipeline_with_client(run.args(), client)
            cache[fine_filtering] = run.target
        return cache[fine_filtering]

    return get


@pytest.fixture
def source_copy(copy_catalog):
    """A private copy of the source fixture; checksummed before and after the test."""
    path = copy_catalog("small_sky_source_catalog")
    before = tree_digest(path)
    yield path
    assert tree_digest(path) == before, "the input catalog was modified"


@pytest.fixture
def sentinels(tmp_path):
    """Files a user keeps beside the output and in tmp_dir: they must survive every run."""
    files = {
        tmp_path / "out" / "users_notes.txt": "beside the artifact",
        tmp_path / "tmp" / "users_scratch.txt": "in tmp_dir",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    yield files
    for path, text in files.items():
        assert path.read_text() == text, f"{path} was changed or deleted"


def random_delays(seed: int, n: int, high: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, high) for _ in range(n)]

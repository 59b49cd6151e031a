"""Fixed cost before any work: checks before any cluster, no process worker for the default run,
whole-run time in the summary, a clear refusal for unguarded scripts, Ctrl-C without worker tracebacks.

Timing targets are measured by benchmarks/startup.py, not here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import distributed
import numpy as np
import pytest

from hats_margin import MarginCacheArguments, OutputExistsError, ScriptGuardError, pipeline, runner
from hats_margin.cli import sample_catalog

SOURCE = "small_sky_source_catalog"


def _args(catalogs, tmp_path, **kwargs):
    base = {
        "input_catalog_path": catalogs / SOURCE, "output_path": tmp_path, "output_artifact_name": "m",
        "margin_threshold": 10, "progress_bar": False,
    }
    return MarginCacheArguments(**(base | kwargs))


@pytest.fixture
def cluster_spy(monkeypatch):
    """Records the keyword arguments of every LocalCluster the pipeline starts."""
    started = []
    real = distributed.LocalCluster

    def spy(**kwargs):
        started.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", spy)
    return started


def test_default_run_uses_an_in_process_cluster_and_times_the_whole_run(catalogs, tmp_path, cluster_spy):
    result = pipeline(_args(catalogs, tmp_path))
    assert [kw["processes"] for kw in cluster_spy] == [False]
    stages = result.stage_seconds
    assert list(stages) == ["planning", "cluster start", "mapping", "reducing", "finishing", "cluster stop"]
    assert result.elapsed_seconds >= sum(stages.values())
    assert f"{result.elapsed_seconds:.1f} s: planning " in result.summary()
    assert "cluster start" in result.summary()


def test_existing_output_is_refused_before_any_cluster_starts(catalogs, tmp_path, cluster_spy):
    pipeline(_args(catalogs, tmp_path))
    with pytest.raises(OutputExistsError, match="already contains a catalog"):
        pipeline(_args(catalogs, tmp_path))
    assert len(cluster_spy) == 1, "the refused run started no cluster"


def test_bad_input_is_refused_before_any_cluster_starts(tmp_path, cluster_spy):
    from hats_margin import InputCatalogError

    with pytest.raises(InputCatalogError, match="does not exist"):
        pipeline(MarginCacheArguments(input_catalog_path=tmp_path / "nope", output_path=tmp_path, output_artifact_name="m"))
    assert cluster_spy == []


@pytest.mark.parametrize("case", ["missing input", "existing output"])
def test_command_line_errors_load_neither_hats_nor_dask(tmp_path, case):
    """The errors a user meets first come back before hats (~1 s to import) or Dask load."""
    existing = tmp_path / "out" / "m"
    existing.mkdir(parents=True)
    (existing / "hats.properties").write_text("obs_collection=m\ndataproduct_type=margin\n")
    source = tmp_path / "missing" if case == "missing input" else sample_catalog()
    code = textwrap.dedent(f"""
        import sys
        from hats_margin import cli
        code = cli.main(["build", {str(source)!r}, {str(tmp_path / 'out')!r}, "--name", "m", "--no-progress"])
        loaded = sorted(m for m in ("hats", "distributed", "dask", "astropy") if m in sys.modules)
        print(code, loaded)
    """)
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "2 []", run.stdout + run.stderr
    expected = "does not exist" if case == "missing input" else "already contains a catalog"
    assert run.stderr.startswith("hats-margin: error: ") and expected in run.stderr


def test_worker_processes_ignore_ctrl_c_so_only_the_driver_reports_it(tmp_path):
    clock = runner.StageClock()
    with runner.local_client(2, 1, tmp_path / "dask", clock) as client:
        handlers = client.run(lambda: int(signal.getsignal(signal.SIGINT)))
    assert list(handlers.values()) == [int(signal.SIG_IGN)] * 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the driver's handler is restored"
    assert set(clock.seconds) == {"cluster start", "cluster stop"}


SCRIPT = """
from hats_margin import MarginCacheArguments, pipeline

args = MarginCacheArguments(
    input_catalog_path={source!r}, output_path={output!r}, output_artifact_name="m",
    margin_threshold=10, progress_bar=False, dask_n_workers=2,
)
{call}
"""


def _run_script(tmp_path, call: str) -> subprocess.CompletedProcess:
    script = tmp_path / "build_margin.py"
    script.write_text(SCRIPT.format(source=str(sample_catalog()), output=str(tmp_path / "out"), call=call))
    return subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


def test_unguarded_script_with_worker_processes_is_told_what_to_add(tmp_path):
    run = _run_script(tmp_path, "print(pipeline(args).summary())")
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("hats_margin.errors.ScriptGuardError: ")
    assert "build_margin.py, line 8, calls pipeline()" in last and 'if __name__ == "__main__":' in last
    assert "dask_n_workers=1" in last
    assert "multiprocessing" not in run.stderr and not (tmp_path / "out").exists()


def test_guarded_script_runs_pipeline_on_two_worker_processes(tmp_path):
    run = _run_script(tmp_path, 'if __name__ == "__main__":\n    print(pipeline(args).summary())')
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("wrote 24 margin rows") and "cluster start" in run.stdout


def test_guard_check_accepts_interactive_and_guarded_callers():
    runner.check_main_guard()  # pytest's own __main__ calls us from functions, not module level
    assert issubclass(ScriptGuardError, RuntimeError)


def test_run_warns_when_the_margin_would_outgrow_its_primary(client, catalogs, tmp_path):
    from hats_margin import pipeline_with_client

    with pytest.warns(UserWarning, match=r"the margin will hold about [\d,]+ rows, more than the primary's 17,161"):
        result = pipeline_with_client(_args(catalogs, tmp_path, margin_threshold="5deg"), client)
    assert result.total_rows > 17161, "the estimate was right: the margin is larger than the primary"


@pytest.fixture(scope="module")
def many_partitions(tmp_path_factory):
    """An all-sky catalog of many small partitions: a run long enough to interrupt."""
    from hats_margin.testing.synthetic import points_table, write_hats_catalog

    rng = np.random.default_rng(5)
    n = 100_000
    ra, dec = rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    path = tmp_path_factory.mktemp("interrupt") / "many"
    return write_hats_catalog(points_table(ra, dec), path, catalog_name="many", max_rows_per_partition=400,
                              highest_order=5)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_prints_only_the_clean_message(many_partitions, tmp_path, workers):
    """SIGINT to the whole process group (what Ctrl-C does) once mapping has started."""
    command = [sys.executable, "-m", "hats_margin", "build", str(many_partitions), str(tmp_path), "--threshold",
               "1800", "--workers", workers, "--no-progress"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - a plain reset
    )
    mapping = tmp_path / "many_30arcmin" / "intermediate" / "mapping"
    deadline = time.monotonic() + 120
    while not mapping.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert err == "hats-margin: error: interrupted; run the same command again to resume where it stopped\n"

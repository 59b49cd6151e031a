"""pipeline_with_client against a separately started scheduler and two worker processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from distributed import Client, get_task_stream

from hats_margin import MarginCacheArguments, cli, pipeline_with_client

CATALOG = "small_sky_source_catalog"
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(processes: list[subprocess.Popen], grace_s: float):
    """End our processes (and any child they started), by pid: those still running after grace_s
    (the client asked the scheduler to shut the cluster down) are killed."""
    children = []
    for process in processes:
        try:
            children += psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def remote_client(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_cluster")
    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    processes: list[subprocess.Popen] = []
    grace_s = 0.1

    def start(name, *argv):
        log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - closed by the process' end
        processes.append(subprocess.Popen([dask, *argv], stdout=log, stderr=subprocess.STDOUT))

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
              "--no-dashboard", "--no-show")
        for i in range(2):
            start(f"worker{i}", "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-nanny",
                  "--no-dashboard",
                  "--name", f"worker{i}", "--local-directory", str(root / f"worker{i}"))
        with Client(address, timeout=START_TIMEOUT_S) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT_S)
            yield client
            grace_s = 3.0
            try:
                client.shutdown()
            except Exception:  # noqa: BLE001 - the processes are killed below anyway
                grace_s = 0.1
    except Exception:
        grace_s = 0.1
        for log in sorted(root.glob("*.log")):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        stop(processes, grace_s)


def margin_rows(catalog_path: Path) -> dict[str, pd.DataFrame]:
    files = sorted((catalog_path / "dataset").rglob("Npix=*.parquet"))
    return {
        str(f.relative_to(catalog_path)): pd.read_parquet(f).sort_values("source_id").reset_index(drop=True)
        for f in files
    }


def test_remote_scheduler_gives_the_local_result(client, remote_client, catalogs, tmp_path):
    def args(output):
        return MarginCacheArguments(
            input_catalog_path=catalogs / CATALOG, output_path=tmp_path / output, output_artifact_name="margin",
            margin_threshold=10, tmp_dir=tmp_path / "scratch", progress_bar=False,
        )

    local = pipeline_with_client(args("local"), client)
    with get_task_stream(remote_client) as stream:
        remote = pipeline_with_client(args("remote"), remote_client)
    workers = {task["worker"] for task in stream.data}
    assert len(workers) == 2, f"both worker processes take tasks, got {workers}"
    assert remote.total_rows == local.total_rows > 0
    assert remote.pixels == local.pixels
    remote_files, local_files = margin_rows(remote.catalog_path), margin_rows(local.catalog_path)
    assert sorted(remote_files) == sorted(local_files)
    for name, frame in local_files.items():
        pd.testing.assert_frame_equal(remote_files[name], frame)


def test_cli_with_remote_scheduler(capsys, remote_client, catalogs, tmp_path):
    address = remote_client.scheduler.address
    code = cli.main(["build", str(catalogs / "small_sky_object_catalog"), str(tmp_path), "--threshold", "3600",
                     "--scheduler", address, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("wrote ") and (tmp_path / "small_sky_object_catalog_1deg" / "hats.properties").exists()

"""runner: how tasks reach Dask (issue 11: the per-task cost of a catalog of many small partitions)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hats_margin import StageFailedError, runner


@dataclass(frozen=True)
class Task:
    key: str


def echo(task: Task) -> str:
    if task.key == "bad":
        raise ValueError("simulated task failure")
    return task.key.upper()


def test_tiny_tasks_reach_dask_in_batches_of_up_to_64(client, monkeypatch):
    """Each Dask task costs ~2 ms of CPU and ~4 ms of latency: 1,000 tiny tasks go as 17 batches
    (they went as 63 of 16), and every task's result still comes back under its own key."""
    submitted = []
    real = client.submit

    def spy(run_batch, func, batch, **kwargs):
        submitted.append(len(batch))
        return real(run_batch, func, batch, **kwargs)

    monkeypatch.setattr(client, "submit", spy)
    tasks = [Task(f"t{i}") for i in range(1000)]
    results = runner.run_stage(client, "Mapping", echo, tasks, progress_bar=False)
    assert results == {t.key: t.key.upper() for t in tasks}
    assert len(submitted) == 17 and max(submitted) <= runner.MAX_BATCH and sum(submitted) == 1000


@pytest.mark.parametrize(("n_tasks", "threads"), [(483, 8), (40, 2), (16_728, 1), (3, 4)])
def test_batches_still_keep_every_thread_busy(n_tasks, threads):
    size = runner.batch_size(n_tasks, threads)
    n_batches = -(-n_tasks // size)
    assert size <= runner.MAX_BATCH
    assert n_batches >= min(n_tasks, 4 * threads), "at least 4 batches per worker thread"


def test_a_failing_task_fails_alone_in_its_batch(client):
    tasks = [Task("a"), Task("bad"), Task("c")]
    with pytest.raises(StageFailedError, match="bad") as info:
        runner.run_stage(client, "Reducing", echo, tasks, progress_bar=False)
    assert list(info.value.failures) == ["bad"]


SIZES: list[int] = []


def echo_batch(tasks: list[Task]) -> dict:
    """A batch function (batched=True): one call per Dask task, one outcome per task."""
    outcome = {}
    for task in tasks:
        try:
            outcome[task.key] = (True, echo(task))
        except ValueError as exc:
            outcome[task.key] = (False, exc)
    SIZES.append(len(tasks))
    return outcome


def test_a_batch_function_gets_whole_batches_and_reports_per_task(client, monkeypatch):
    monkeypatch.setattr(runner, "batch_size", lambda n_tasks, threads: 4)
    tasks = [Task(f"t{i}") for i in range(9)]
    SIZES.clear()
    results = runner.run_stage(client, "Mapping", echo_batch, tasks, progress_bar=False, batched=True)
    assert results == {t.key: t.key.upper() for t in tasks}
    assert sorted(SIZES) == [1, 4, 4], "one call per batch (the in-process client shares this module)"
    with pytest.raises(StageFailedError, match="bad") as info:
        runner.run_stage(client, "Mapping", echo_batch, [Task("a"), Task("bad"), Task("c")], progress_bar=False,
                         batched=True)
    assert list(info.value.failures) == ["bad"]


def test_weighted_batches_keep_neighbours_together_and_go_heaviest_first(client, monkeypatch):
    """Reduce tasks come in spatial order (neighbours share shards): batches stay runs of
    consecutive tasks, submitted by total weight, heaviest first."""
    monkeypatch.setattr(runner, "batch_size", lambda n_tasks, threads: 3)
    submitted = []
    real = client.submit

    def spy(func, batch, **kwargs):
        submitted.append([t.key for t in batch])
        return real(func, batch, **kwargs)

    monkeypatch.setattr(client, "submit", spy)
    weights = {"t0": 1, "t1": 1, "t2": 1, "t3": 50, "t4": 1, "t5": 1, "t6": 9, "t7": 9}
    tasks = [Task(key) for key in weights]
    results = runner.run_stage(client, "Reducing", echo_batch, tasks, progress_bar=False, batched=True,
                               weight=lambda task: weights[task.key])
    assert results == {t.key: t.key.upper() for t in tasks}
    assert submitted == [["t3", "t4", "t5"], ["t6", "t7"], ["t0", "t1", "t2"]]


@pytest.mark.parametrize("n_workers", [1, 2])
def test_the_run_own_cluster_has_no_statistical_profiler(tmp_path, n_workers):
    """The cluster a run makes (in-process or worker processes) does not sample its worker threads'
    stacks every 10 ms (nobody sees the profile: no dashboard); a client the user makes keeps
    Dask's own default, and the setting does not leak out of the run."""
    import dask
    from distributed import Client, LocalCluster

    def profiling(dask_worker) -> bool:
        return "profile" in dask_worker.periodic_callbacks

    with runner.local_client(n_workers, 1, tmp_path / "dask", runner.StageClock()) as client:
        assert list(client.run(profiling).values()) == [False] * n_workers
    assert dask.config.get("distributed.worker.profile.enabled") is True
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        assert list(client.run(profiling).values()) == [True]

"""The only module that talks to dask.distributed: submit tasks, show progress, gather failures.

A task that raises is logged once at INFO (with the partition it worked on, added to the
exception by the task; shown by the CLI's ``--verbose``) and the stage ends with one
StageFailedError: one line with the first failed keys, their count and the first error.
A worker that dies mid-task is not a failure: the scheduler re-runs its task on another
worker (distributed's ``allowed-failures``), and tasks are idempotent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from distributed import Client, as_completed
from tqdm.auto import tqdm

from hats_margin.errors import StageFailedError

logger = logging.getLogger(__name__)

STAGE_WIDTH = 10


def progress(stage: str, total: int, enabled: bool, skipped: int = 0):
    """A tqdm bar labelled with the stage name (aligned), or a disabled one."""
    desc = f"{stage:<{STAGE_WIDTH}}"
    if skipped:
        desc += f" ({skipped} done earlier, skipped)"
    return tqdm(total=total, desc=desc, disable=not enabled, unit="task", dynamic_ncols=True)


def run_stage(
    client: Client,
    stage: str,
    func: Callable,
    tasks: Sequence,
    *,
    progress_bar: bool,
    skipped: int = 0,
    resume_hint: str = "",
) -> dict[str, object]:
    """Run ``func(task)`` for every task on the cluster. Returns ``{task.key: result}``.

    Small tasks are sent in batches (see ``batch_size``) so that Dask's per-task cost does not
    dominate catalogs of many small partitions; results and failures stay per task.
    """
    results: dict[str, object] = {}
    failures: dict[str, BaseException] = {}
    if skipped:
        logger.info("%s: %d task(s) done in an earlier run, skipped", stage, skipped)
    token = uuid.uuid4().hex[:8]
    size = batch_size(len(tasks), _total_threads(client))
    batches = [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]
    with progress(stage, len(tasks), progress_bar, skipped) as bar:
        futures = {
            client.submit(
                _run_batch, func, batch, key=f"hats-margin-{stage.lower()}-{batch[0].key}-{token}", pure=False
            ): batch
            for batch in batches
        }
        for future in as_completed(futures):
            batch = futures[future]
            if future.status == "error":
                # the whole batch failed outside any one task (e.g. unpicklable input)
                outcome = {task.key: (False, future.exception()) for task in batch}
            else:
                outcome = future.result()
            for key, (ok, value) in outcome.items():
                if ok:
                    results[key] = value
                else:
                    failures[key] = value
                    # one line per task only in the verbose log: the StageFailedError summarises them
                    logger.info("%s task %s failed: %s: %s", stage, key, type(value).__name__, _with_notes(value))
            future.release()
            bar.update(len(batch))
    if failures:
        raise StageFailedError(stage.lower(), failures, resume_hint)
    return results


def batch_size(n_tasks: int, threads: int) -> int:
    """Tasks per Dask task: at least 4 batches per worker thread (load balance), at most 16
    tasks per batch (progress and retry granularity)."""
    if n_tasks == 0:
        return 1
    n_batches = max(min(n_tasks, 4 * max(threads, 1)), -(-n_tasks // 16))
    return max(1, -(-n_tasks // n_batches))


def _total_threads(client: Client) -> int:
    try:
        return sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that cannot answer: assume one thread
        return 1


def _run_batch(func: Callable, tasks: list) -> dict[str, tuple[bool, object]]:
    """Run tasks one after another on a worker; each task's failure is kept apart."""
    outcome = {}
    for task in tasks:
        try:
            outcome[task.key] = (True, func(task))
        except Exception as exc:  # noqa: BLE001 - reported by the driver, with the task's notes
            outcome[task.key] = (False, exc)
    return outcome


def _with_notes(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    return "; ".join([str(exc), *notes])


class StageClock:
    """Wall time per stage, for the result and the benchmarks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

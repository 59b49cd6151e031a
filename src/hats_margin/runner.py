"""The only module that talks to dask.distributed: submit tasks, show progress, gather failures.

A task that raises is reported once (with the partition it worked on, added to the
exception by the task) and the stage ends with one StageFailedError listing every failed
key. A worker that dies mid-task is not a failure: the scheduler re-runs its task on
another worker (distributed's ``allowed-failures``), and tasks are idempotent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence

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
    """Run ``func(task)`` for every task on the cluster. Returns ``{task.key: result}``."""
    results: dict[str, object] = {}
    failures: dict[str, BaseException] = {}
    if skipped:
        logger.info("%s: %d task(s) done in an earlier run, skipped", stage, skipped)
    token = uuid.uuid4().hex[:8]
    with progress(stage, len(tasks), progress_bar, skipped) as bar:
        futures = {
            client.submit(func, task, key=f"hats-margin-{stage.lower()}-{task.key}-{token}", pure=False): task.key
            for task in tasks
        }
        for future in as_completed(futures):
            key = futures[future]
            if future.status == "error":
                exc = future.exception()
                failures[key] = exc
                logger.error("%s task %s failed: %s: %s", stage, key, type(exc).__name__, _with_notes(exc))
            else:
                results[key] = future.result()
            future.release()
            bar.update(1)
    if failures:
        raise StageFailedError(stage.lower(), failures, resume_hint)
    return results


def _with_notes(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    return "; ".join([str(exc), *notes])


class StageClock:
    """Wall time per stage, for the result and the benchmarks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        clock = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[stage] = clock.seconds.get(stage, 0.0) + time.perf_counter() - self.start

        return _Timer()

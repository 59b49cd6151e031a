"""The only module that talks to dask.distributed: submit tasks, show progress, gather failures.

A task that raises is logged once at INFO (with the partition it worked on, added to the
exception by the task; shown by the CLI's ``--verbose``) and the stage ends with one
StageFailedError: one line with the first failed keys, their count and the first error.
A worker that dies mid-task is not a failure: the scheduler re-runs its task on another
worker (distributed's ``allowed-failures``), and tasks are idempotent.
"""

from __future__ import annotations

import ast
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from hats_margin.errors import ScriptGuardError, StageFailedError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

# dask.distributed and tqdm load on first use (a fraction of a second each): argument and
# output errors are reported before they are needed.

logger = logging.getLogger(__name__)

STAGE_WIDTH = 10


def progress(stage: str, total: int, enabled: bool, skipped: int = 0):
    """A tqdm bar labelled with the stage name (aligned), or, disabled, a no-op one (tqdm.auto
    costs ~0.1 s to import)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    desc = f"{stage:<{STAGE_WIDTH}}"
    if skipped:
        desc += f" ({skipped} done earlier, skipped)"
    return tqdm(total=total, desc=desc, disable=not enabled, unit="task", dynamic_ncols=True)


class _NoBar:
    """The progress bar of a run without one: a context manager whose ``update`` does nothing."""

    def __enter__(self):
        """The bar itself."""
        return self

    def __exit__(self, *exc):
        """Nothing to close."""
        return False

    def update(self, n: int = 1):
        """Ignore progress."""


def run_stage(
    client: Client,
    stage: str,
    func: Callable,
    tasks: Sequence,
    *,
    progress_bar: bool,
    skipped: int = 0,
    resume_hint: str = "",
    batched: bool = False,
    weight: Callable | None = None,
) -> dict[str, object]:
    """Run ``func(task)`` for every task on the cluster. Returns ``{task.key: result}``.

    Small tasks are sent in batches (see ``batch_size``) so that Dask's per-task cost does not
    dominate catalogs of many small partitions; results and failures stay per task. With
    ``batched``, ``func`` takes a whole batch (a list of tasks) and returns ``{task.key: (ok,
    result or exception)}`` for each, as ``run_each`` does (the map stage writes one shard and
    one marker per batch). With ``weight`` (a task's expected cost), batches of consecutive tasks
    are sent heaviest first: tasks that share inputs stay together (the reduce tasks of
    neighbouring pixels read the same shards) and the largest work still starts first.
    """
    from distributed import as_completed

    results: dict[str, object] = {}
    failures: dict[str, BaseException] = {}
    if skipped:
        logger.info("%s: %d task(s) done in an earlier run, skipped", stage, skipped)
    token = uuid.uuid4().hex[:8]
    size = batch_size(len(tasks), _total_threads(client))
    batches = [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]
    if weight is not None:
        batches.sort(key=lambda batch: -sum(weight(task) for task in batch))
    call = (func,) if batched else (run_each, func)
    with progress(stage, len(tasks), progress_bar, skipped) as bar:
        futures = {
            client.submit(
                *call, batch, key=f"hats-margin-{stage.lower()}-{batch[0].key}-{token}", pure=False
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


@contextmanager
def dask_client(scheduler: str | None, n_workers: int = 1, threads_per_worker: int = 1, local_directory=None):
    """A client of the running scheduler at ``scheduler``, else of a local cluster made as for a
    build (``local_client``: one worker runs in-process, more are processes), closed on exit."""
    if scheduler is not None:
        from distributed import Client

        with Client(scheduler) as client:
            yield client
        return
    with local_client(n_workers, threads_per_worker, local_directory, StageClock()) as client:
        yield client


MAX_BATCH = 64
"""Most tasks in one Dask task. Each Dask task costs the driver and scheduler ~2 ms of CPU and
~4 ms of latency (measured in-process), as much as a map task of a 200-row partition; 64 keeps
that under a few percent while a batch of the smallest tasks still ends within a second or so
(progress, and the work a lost worker's batch redoes)."""


def batch_size(n_tasks: int, threads: int) -> int:
    """Tasks per Dask task: at least 4 batches per worker thread (load balance), at most
    ``MAX_BATCH`` tasks per batch."""
    if n_tasks == 0:
        return 1
    n_batches = max(min(n_tasks, 4 * max(threads, 1)), -(-n_tasks // MAX_BATCH))
    return max(1, n_tasks // n_batches)  # rounded down: never fewer batches than n_batches


def _total_threads(client: Client) -> int:
    """Worker threads of the client's cluster (1 if the scheduler cannot say)."""
    try:
        return sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that cannot answer: assume one thread
        return 1


def run_each(func: Callable, tasks: list) -> dict[str, tuple[bool, object]]:
    """Run tasks one after another on a worker; each task's failure is kept apart."""
    outcome = {}
    for task in tasks:
        try:
            outcome[task.key] = (True, func(task))
        except Exception as exc:  # noqa: BLE001 - reported by the driver, with the task's notes
            outcome[task.key] = (False, exc)
    return outcome


def _with_notes(exc: BaseException) -> str:
    """The exception's message followed by its notes (which task, which file), ``; ``-separated."""
    notes = getattr(exc, "__notes__", None) or []
    return "; ".join([str(exc), *notes])


class StageClock:
    """Wall time per stage, for the result and the benchmarks."""

    def __init__(self):
        """No stage timed yet."""
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        """Context manager adding the wall time (seconds) of its block to ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@contextmanager
def client_for(args, client: Client | None, clock: StageClock) -> Iterator[Client]:
    """The caller's ``client``, else a local cluster made for this run from ``args.dask_*``."""
    if client is not None:
        yield client
        return
    with local_client(args.dask_n_workers, args.dask_threads_per_worker, args.dask_tmp, clock) as own_client:
        yield own_client


OWN_CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False}
"""Dask settings of the local cluster a run makes for itself. Its workers' statistical profiler
(a stack walk of every worker thread each 10 ms, under the GIL, in the thread that also serves
the scheduler and client of an in-process cluster) feeds a dashboard this cluster does not serve;
a client the user passes keeps the user's settings."""


@contextmanager
def local_client(n_workers: int, threads_per_worker: int, local_directory, clock: StageClock) -> Iterator[Client]:
    """A Dask client on a local cluster made for one run; its start and stop are timed on ``clock``.

    One worker runs as threads inside this process (no process to spawn, nothing to pickle, about
    a second saved per run); more workers are processes (parallel pyarrow and numpy work without
    sharing one interpreter). Worker processes start with SIGINT ignored, so Ctrl-C interrupts
    the driver only and the command line prints one clean message instead of their tracebacks.
    """
    import dask
    from distributed import Client, LocalCluster

    processes = n_workers > 1
    with ExitStack() as stack:
        with clock("cluster start"), _sigint_ignored(processes), dask.config.set(OWN_CLUSTER_CONFIG):
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=threads_per_worker,
                    processes=processes,
                    local_directory=None if local_directory is None else str(local_directory),
                    dashboard_address=None,
                    scheduler_kwargs={"dashboard_address": ":0"},  # no "8787 in use" warning
                )
            )
            client = stack.enter_context(Client(cluster))
        try:
            yield client
        except KeyboardInterrupt:
            _quiet_dask_logs()  # its tasks are cancelled: no shutdown warnings under the user's message
            raise
        finally:
            with clock("cluster stop"):
                stack.close()


def _quiet_dask_logs():
    """Silence the ``distributed`` loggers (only errors above CRITICAL are shown)."""
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def _sigint_ignored(enabled: bool):
    """Ignore SIGINT while worker processes are spawned (they inherit it), then restore."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_main_guard():
    """Refuse to start worker processes from unguarded module-level code of a script.

    Worker processes re-import the ``__main__`` script; a ``pipeline()`` call at its top level
    would run again in every worker and end in a long multiprocessing traceback. Raised before
    anything starts, naming the line to move under ``if __name__ == "__main__":``.
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if not script:
        return  # interactive session, python -c, notebook: nothing is re-imported
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            break
        frame = frame.f_back
    if frame is None or _guarded_line(frame.f_code.co_filename, frame.f_lineno):
        return
    raise ScriptGuardError(
        f"{frame.f_code.co_filename}, line {frame.f_lineno}, calls pipeline() with dask_n_workers > 1 at the top "
        "level of the script: worker processes re-import the script and would run it again. Put the call "
        'under `if __name__ == "__main__":`, or use dask_n_workers=1 (threads, no worker process)'
    )


def _guarded_line(filename: str, lineno: int) -> bool:
    """Is line ``lineno`` of ``filename`` inside a top-level ``if __name__ == "__main__":`` block?
    Unreadable source counts as guarded (nothing to point at)."""
    try:
        with open(filename, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (OSError, SyntaxError, ValueError):
        return True
    return any(
        isinstance(node, ast.If) and _is_main_test(node.test)
        and node.body[0].lineno <= lineno <= (node.body[-1].end_lineno or lineno)
        for node in tree.body
    )


def _is_main_test(test: ast.expr) -> bool:
    """Whether ``test`` is the expression ``__name__ == '__main__'`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]

"""Run one margin build in this process; the kill tests start it as a subprocess.

    python run_margin.py '<json of MarginCacheArguments kwargs>' [--threads] [--die-at POINT]
                         [--sleep-at POINT=SECONDS]

``--threads``: the pipeline runs on an in-process threaded Dask client (fast start, and the
map/reduce tasks run in this process). Without it, ``pipeline()`` starts a LocalCluster with
worker processes (a SIGKILL of the process group kills them too).

``--die-at POINT``: SIGKILL the whole process group at an exact point of the run. Test-only
instrumentation: the package's functions are wrapped here, in this script, never in the
package. Points (``:N`` = at the N-th occurrence); the map/reduce points need ``--threads``:

    after-plan            planning done, before the output lock is taken
    after-lock            lock taken, before the intermediate directory is prepared
    after-run-json        intermediate directory and run.json written, no task run yet
    map-shard:N           after the N-th write of buffered rows into a batch's shard (here
                          every send is written at once: the shard has record batches but no
                          footer yet, no marker)
    map-shard-closed:N    after the N-th batch of map tasks has completed its shard, before its
                          done marker
    map-marker:N          after the N-th done marker of a batch of map tasks (one Dask task;
                          with 14 tasks on 2 threads a batch is one map task, on 1 thread three)
    reduce-write:N        after the N-th write into a margin file (a partial parquet file; the
                          streaming writer, which small files otherwise skip)
    reduce-close:N        after the N-th margin file is written whole, before it is published
    reduce-publish:N      after the N-th margin file is renamed into place (a reduce task's
                          done marker: no marker file per margin pixel)
    after-metadata        finishing: _metadata and _common_metadata written
    after-properties-tmp  finishing: .hats.properties.tmp written, not yet renamed
    after-properties      finishing: hats.properties and properties written, before clean-up
    mid-clean-up:N        finishing: after N files/directories of the intermediate were deleted
    after-clean-up        clean-up done, before the lock is released
    mid-swap:N            overwrite: after the N-th move of the swap of the new catalog into place

``--sleep-at POINT=SECONDS``: pause there instead (e.g. to hold the output lock while a test
starts a second run). Prints ``READY`` when it starts sleeping and ``RESULT {json}`` on success.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import sys
import time


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def after(owner, name: str, nth: int = 1, action=None):
    """Wrap owner.name so that the process group dies (or ``action`` runs) right after its nth call
    returns."""
    action = action or die
    original = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == nth:
            action()
        return result

    setattr(owner, name, wrapper)


def install(point: str, action=None):

    from hats_margin import artifact, io
    from hats_margin.stages import finishing, mapping, planning, reducing

    pipeline = importlib.import_module("hats_margin.resume.output")

    name, _, count = point.partition(":")
    nth = int(count or 1)
    if name == "after-plan":
        after(planning, "make_plan", nth, action)
    elif name == "after-lock":
        after(pipeline.OutputLock, "acquire", nth, action)
    elif name == "after-run-json":
        after(pipeline, "prepare_intermediate", nth, action)
    elif name == "map-shard":
        io.SHARD_FLUSH_BYTES = 0  # else rows are buffered up to the end of the batch
        after(io.ShardWriters, "_write_pending", nth, action)
    elif name == "map-shard-closed":
        after(io.ShardWriters, "close", nth, action)
    elif name == "map-marker":
        after(mapping, "write_json", nth, action)
    elif name == "reduce-write":  # a margin file open and being written (the streaming writer)
        io.SMALL_FILE_BYTES = 0  # else small files are written whole at close
        after(io.MarginFileWriter, "write", nth, action)
    elif name == "reduce-close":  # a small margin file written whole, not yet published
        after(io.MarginFileWriter, "close", nth, action)
    elif name == "reduce-publish":
        after(reducing, "publish", nth, action)
    elif name == "after-metadata":
        after(finishing, "write_metadata_files", nth, action)
    elif name == "after-properties-tmp":
        after(finishing, "_write_properties_tmp", nth, action)
    elif name == "after-properties":
        after(finishing, "_write_properties_last", nth, action)
    elif name == "mid-clean-up":
        clean_up = finishing.clean_up

        def dying_clean_up(plan):
            # delete the intermediate tree one entry at a time (deepest first, as rm -r does)
            # and die after nth deletions
            import shutil

            shutil_rmtree, deleted = shutil.rmtree, {"n": 0}

            def counted(fn):
                def inner(*args, **kwargs):
                    fn(*args, **kwargs)
                    deleted["n"] += 1
                    if deleted["n"] >= nth:
                        die()

                return inner

            unlink, rmdir = counted(os.unlink), counted(os.rmdir)

            def slow_rmtree(path, *args, **kwargs):
                for root, dirs, files in os.walk(path, topdown=False):
                    for file in files:
                        unlink(os.path.join(root, file))
                    for folder in dirs:
                        rmdir(os.path.join(root, folder))
                rmdir(path)

            # the clean-up deletes entry by entry itself (TempLayout.remove): count those too
            os_unlink, os_rmdir = os.unlink, os.rmdir
            shutil.rmtree, os.unlink, os.rmdir = slow_rmtree, unlink, rmdir
            try:
                clean_up(plan)
            finally:
                shutil.rmtree, os.unlink, os.rmdir = shutil_rmtree, os_unlink, os_rmdir

        finishing.clean_up = dying_clean_up
    elif name == "mid-swap":
        after(artifact, "_move", nth, action)
    elif name == "after-clean-up":
        after(finishing, "clean_up", nth, action)
    else:
        raise SystemExit(f"unknown --die-at point {point!r}")


def main(argv: list[str]) -> int:
    kwargs = json.loads(argv[1])
    options = argv[2:]
    threads = "--threads" in options
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    from hats_margin import MarginCacheArguments, pipeline, pipeline_with_client

    if "--die-at" in options:
        install(options[options.index("--die-at") + 1])
    if "--sleep-at" in options:
        point, _, seconds = options[options.index("--sleep-at") + 1].partition("=")

        def pause():
            print("READY", flush=True)
            time.sleep(float(seconds))

        install(point, pause)
    args = MarginCacheArguments(**kwargs)
    if threads:
        from distributed import Client

        with Client(
            n_workers=1, threads_per_worker=args.dask_threads_per_worker, processes=False, dashboard_address=None
        ) as client:
            result = pipeline_with_client(args, client)
    else:
        result = pipeline(args)
    margins = getattr(result, "margins", [result])  # several thresholds: one result per margin
    payload = {"total_rows": [m.total_rows for m in margins], "skipped": margins[0].skipped_tasks}
    if len(margins) == 1:
        payload = {"total_rows": result.total_rows, "pixels": result.pixels, "skipped": result.skipped_tasks}
    print("RESULT " + json.dumps(payload), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

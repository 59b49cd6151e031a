"""A process that tries to take the output lock once per trial, in step with the others
(multiprocessing barriers), and reports whether it got it (see test_lock_race.py)."""

from __future__ import annotations


def contend(path: str, trials: int, start, attempted, released, results, index: int, storage_options=None):
    from upath import UPath

    from hats_margin.errors import OutputLockedError
    from hats_margin.resume import OutputLock

    for _ in range(trials):
        start.wait()
        lock = OutputLock(UPath(path, **(storage_options or {})))
        try:
            lock.acquire()
            results[index] = 1 + (2 if lock.taken_over else 0)
        except OutputLockedError:
            results[index] = 0
        except Exception:  # noqa: BLE001 - an unexpected error is a failed trial, not a hang
            import traceback

            traceback.print_exc()
            results[index] = -1
        attempted.wait()  # every contender has tried; the test counts the holders
        attempted.wait()
        lock.release()
        released.wait()

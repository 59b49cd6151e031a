"""Resume, in one place: how a run starts at its output and what of an earlier run it keeps.

- ``output``: which files at the output belong to a run; :func:`start` takes the output lock
  and decides whether the run starts fresh, resumes (with the done markers of a killed run)
  or only completes a catalog a dead run with the same values had written.
- ``intermediate``: the intermediate directory, its fingerprint (``run.json``), refusal of
  changed values, discarding.
- ``done``: which tasks an earlier run finished (map done markers, published margin files).
- the output lock lives in ``lock.py`` (re-exported here); it records the run's fingerprint and
  phase, so the next run can tell that a dead run had finished writing its catalog.
"""

from hats_margin.lock import LOCK_NAME, OutputLock, fingerprint_digest
from hats_margin.resume.done import done_maps, done_reduces
from hats_margin.resume.intermediate import digest, discard_intermediate, prepare_intermediate
from hats_margin.resume.output import COMPLETE, FRESH, RESUME, Start, finish_earlier_run, publish, start

__all__ = [
    "COMPLETE",
    "FRESH",
    "LOCK_NAME",
    "RESUME",
    "OutputLock",
    "Start",
    "digest",
    "discard_intermediate",
    "done_maps",
    "done_reduces",
    "fingerprint_digest",
    "finish_earlier_run",
    "prepare_intermediate",
    "publish",
    "start",
]

"""The intermediate directory of a run: its fingerprint in ``run.json``, resumed or discarded.

A run records its fingerprint in ``<intermediate>/run.json`` before any task runs. A later
run with ``resume=True`` continues only if every value matches; otherwise it refuses and
names the values that changed. ``resume=False`` deletes only this run's own intermediate
directory.

Invariant: while ``run.json`` exists, everything a done marker claims exists too. So
intermediate files are always discarded ``run.json`` first, and a directory without
``run.json`` is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time

from hats_margin.errors import OutputExistsError, ResumeMismatchError
from hats_margin.io import TempLayout, read_json, write_json
from hats_margin.pixel import Pixel
from hats_margin.resume.done import done_maps

logger = logging.getLogger(__name__)


def prepare_intermediate(layout: TempLayout, fingerprint: dict, resume: bool) -> bool:
    """Make the intermediate directory ready. Returns True when resuming earlier work."""
    recorded = read_json(layout.run_file)
    if recorded is None and layout.run_file.exists():
        recorded = {}  # unreadable run.json: ours, but nothing to resume from
    if recorded is not None and recorded.get("fingerprint", {}).get("output", fingerprint.get("output")) != (
        fingerprint.get("output")
    ):
        # tmp_dir/<name>/intermediate is shared by every output called <name>: never take another's
        raise OutputExistsError(
            f"the intermediate directory {layout.base} belongs to a run writing "
            f"{recorded['fingerprint']['output']}, not {fingerprint.get('output')}; use another tmp_dir, "
            "or delete that directory if that run is abandoned"
        )
    if recorded is None and layout.base.exists() and not _is_ours(layout):
        raise OutputExistsError(
            f"the intermediate directory {layout.base} exists and holds files hats-margin did not write; "
            "use another tmp_dir (or output_artifact_name), or empty that directory"
        )
    if recorded and resume:
        previous = recorded.get("fingerprint", {})
        differing = [key for key in sorted(set(previous) | set(fingerprint)) if previous.get(key) != fingerprint.get(key)]
        changed = [
            change
            for key in differing
            if (change := _describe_change(layout, key, previous.get(key), fingerprint.get(key)))
        ]
        if changed:
            raise ResumeMismatchError(
                f"cannot resume from the intermediate files in {layout.base}: they were made with other "
                f"values: {'; '.join(changed)}. Re-run with the earlier values to resume, or pass "
                "resume=False (CLI: --no-resume) to discard them and start fresh."
            )
        layout.make_dirs()
        if differing:  # only partitions not mapped yet changed (e.g. a corrupt file fixed): record them
            write_json(layout.run_file, {**recorded, "fingerprint": fingerprint})
        return True
    if layout.base.exists():
        logger.info("discarding intermediate files in %s (resume=False or no usable run.json)", layout.base)
        discard_intermediate(layout)
    layout.make_dirs()
    write_json(layout.run_file, {"fingerprint": fingerprint, "created": time.time()})
    return False


def _describe_change(layout: TempLayout, key: str, was, now) -> str | None:
    """What changed, for the refusal; None for a change that cannot mix runs: partition files
    edited before their map task ever finished (their shards are written again)."""
    if key == "input_files" and isinstance(was, dict) and isinstance(now, dict):
        if was.keys() != now.keys():
            return "input_files (the set of partition files changed)"
        edited = sorted(k for k in was if was[k] != now[k])
        done = done_maps(layout) if edited else {}
        mapped = [k for k in edited if k in done]
        if not mapped:
            return None
        shown = ", ".join("Norder={}/Npix={}".format(*Pixel.parse(k)) for k in mapped[:5])
        more = f" and {len(mapped) - 5} more" if len(mapped) > 5 else ""
        return (
            f"input_files ({len(mapped)} partition file(s) changed after that run had read them: {shown}{more}; "
            "resuming would mix old and new rows)"
        )
    return f"{key} (was {was!r}, now {now!r})"


def discard_intermediate(layout: TempLayout):
    """Delete what a run wrote in the intermediate directory, run.json first: a deletion cut short
    leaves a directory that is never resumed (markers whose shards are gone), only discarded
    again. Files a run does not write are kept, at every depth (TempLayout.remove)."""
    kept = layout.remove()
    if kept:
        logger.warning(
            "kept %d file(s) in %s that hats-margin did not write: %s", len(kept), layout.base, ", ".join(kept[:5])
        )


_TEMP_JSON = re.compile(r"^\.run\.json\.\d+\.tmp$")


def _is_ours(layout: TempLayout) -> bool:
    """An intermediate directory without run.json is ours only if it holds nothing but our subdirs
    (and the temporary file of a run.json write cut short)."""
    names = {p.name for p in layout.base.iterdir()}
    return all(name in {"mapping", "reducing", "shards", "run.json"} or _TEMP_JSON.match(name) for name in names)


def digest(value) -> str:
    """Short stable hash of a JSON-able value (fingerprint fields, whole fingerprints)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

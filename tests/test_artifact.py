"""Replacing a catalog never loses both the old and the new one (issue 13 item 3).

The swap is cut at every step (an exception stands for a SIGKILL: nothing after it runs), on a
local disk and on S3 (moto on loopback); then the next run's recovery must put the new catalog in
place and leave nothing else. At every cut, the old catalog is whole in the artifact directory
plus its aside directory, and the new one whole in the artifact directory plus the staging one.
"""

from __future__ import annotations

import logging

import pytest
from upath import UPath

from hats_margin import artifact
from helpers import moto_s3

OLD = {"hats.properties": "old props", "properties": "old props", "partition_info.csv": "old info",
       "dataset/_metadata": "old meta", "dataset/Norder=2/Dir=0/Npix=1.parquet": "old rows"}
NEW = {"hats.properties": "new props", "properties": "new props", "partition_info.csv": "new info",
       "dataset/_metadata": "new meta", "dataset/Norder=1/Dir=0/Npix=9.parquet": "new rows",
       "margin_sky_map.png": "new png"}


class Killed(BaseException):
    """Stands for a SIGKILL: not an Exception, so nothing catches it."""


def files(root: UPath) -> dict[str, str]:
    if not root.exists():
        return {}
    fs, base = root.fs, root.path.rstrip("/")
    return {f[len(base) + 1:]: fs.cat_file(f).decode() for f in fs.find(base)}


def setup(target: UPath) -> UPath:
    for name, text in OLD.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    (target / ".hats-margin.lock").write_text("{}")
    staging = target / artifact.STAGING_NAME
    artifact.claim(staging, "digest-of-the-new-run")
    for name, text in NEW.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    return staging


def whole(found: dict, wanted: dict) -> bool:
    return all(found.get(name) == text for name, text in wanted.items())


def cut_after(monkeypatch, steps: int, fs=None):
    """Make the swap die after ``steps`` file-system steps (moves, deletions, records; on an
    object store also each file of a directory moved file by file)."""
    count = {"n": 0}

    def wrap(function):
        def wrapper(*args, **kwargs):
            if count["n"] >= steps:
                raise Killed
            count["n"] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in ("_move", "remove_tree", "remove_file", "write_json"):
        monkeypatch.setattr(artifact, name, wrap(getattr(artifact, name)))
    if fs is not None:
        monkeypatch.setattr(fs, "mv", wrap(fs.mv))
    return count


def swap_cut_at_every_step(target: UPath, monkeypatch, only=None):
    steps = 0
    while True:
        if only is not None and steps not in only and steps < max(only):
            steps += 1
            continue
        for child in list(target.iterdir()) if target.exists() else []:
            child.fs.rm(child.path, recursive=True)
        staging = setup(target)
        with monkeypatch.context() as patch:
            cut_after(patch, steps, None if target.protocol in ("", "file") else target.fs)
            try:
                artifact.swap_in(target, staging)
                finished = True
            except Killed:
                finished = False
        everything = files(target)
        top, aside, staged = {}, {}, {}
        for key, text in everything.items():
            first, _, rest = key.partition("/")
            {artifact.ASIDE_NAME: aside, artifact.STAGING_NAME: staged}.get(first, top)[
                rest if first in (artifact.ASIDE_NAME, artifact.STAGING_NAME) else key] = text
        new_whole, old_whole = whole(top | staged, NEW), whole(top | aside, OLD)
        assert new_whole, f"the new catalog is not whole after step {steps}"
        if steps < len(OLD):  # until the old contents are all aside and the first new entry moves in
            assert old_whole, f"the old catalog is not whole after step {steps}"
        record = artifact.recover_swap(target)
        if record is None and artifact.owner(target / artifact.STAGING_NAME):
            # the swap had not started: the re-run finds a complete staged catalog with its own
            # values (the orchestrator's _COMPLETE) and swaps it in
            assert steps <= 1 and artifact.owner(target / artifact.STAGING_NAME)["fingerprint"] == "digest-of-the-new-run"
            artifact.swap_in(target, target / artifact.STAGING_NAME)
        elif not finished:
            assert record is None or record["fingerprint"] == "digest-of-the-new-run"
        assert files(target) == NEW | {".hats-margin.lock": "{}"}, f"recovery after step {steps}"
        if finished or (only is not None and steps >= max(only)):
            return steps
        steps += 1


def test_a_swap_cut_at_any_step_is_completed_by_the_next_run(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="hats_margin")
    steps = swap_cut_at_every_step(UPath(tmp_path / "margin"), monkeypatch)
    assert steps >= len(OLD) + len(NEW)  # every step was cut once


@pytest.fixture
def s3_target():
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with moto_s3() as options:
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        if not fs.exists("swap"):  # moto's store outlives one server in this process
            fs.mkdir("swap")
        yield UPath("s3://swap/margins/margin", **options)


def test_a_swap_cut_in_each_phase_on_s3(s3_target, monkeypatch):
    """Cut while the old entries go aside, while the new ones come in (a directory half moved,
    file by file), and while the old one is deleted; the full sweep is marked slow."""
    swap_cut_at_every_step(s3_target, monkeypatch, only={3, 6, 12, 22})


@pytest.mark.slow
def test_a_swap_cut_at_any_step_on_s3(s3_target, monkeypatch):
    steps = swap_cut_at_every_step(s3_target, monkeypatch)
    assert steps >= len(OLD) + len(NEW)

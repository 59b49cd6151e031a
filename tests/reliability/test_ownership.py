"""Nothing lost that is not ours: no path outside output_path/output_artifact_name and the run's
own intermediate directory is ever deleted, even with overwrite=True or resume=False; the input
is never modified (the ``source_copy`` fixture checksums it around every test)."""

from __future__ import annotations

import logging
import shutil

import pytest
from harness import NAME, Run, assert_same_margin, finish, spawn, tree_digest
from hats.io.validation import is_valid_catalog
from upath import UPath

from hats_margin import OutputExistsError, StageFailedError, pipeline_with_client
from hats_margin.io import TempLayout

BAD_PARTITION = ("dataset", "Norder=2", "Dir=0", "Npix=183.parquet")


def test_overwrite_and_fresh_start_keep_users_files(client, baselines, source_copy, sentinels, tmp_path):
    run = Run(source_copy, tmp_path / "out", tmp_dir=tmp_path / "tmp")
    pipeline_with_client(run.args(), client)
    # a user's file inside tmp_dir/<name> (the parent of our intermediate directory)
    beside_intermediate = tmp_path / "tmp" / NAME / "notes.txt"
    beside_intermediate.parent.mkdir(parents=True, exist_ok=True)
    beside_intermediate.write_text("mine")
    pipeline_with_client(run.args(overwrite=True), client)
    pipeline_with_client(run.args(overwrite=True, resume=False), client)
    assert_same_margin(run.target, baselines(False))
    assert beside_intermediate.read_text() == "mine"
    # the sentinels fixture checks output_path/users_notes.txt and tmp_dir/users_scratch.txt


def test_existing_valid_catalog_is_not_replaced_without_overwrite(client, source_copy, tmp_path):
    run = Run(source_copy, tmp_path / "out")
    pipeline_with_client(run.args(), client)
    before = tree_digest(run.target)
    for resume in (True, False):
        with pytest.raises(OutputExistsError, match="already contains a catalog; pass overwrite=True"):
            pipeline_with_client(run.args(resume=resume), client)
    assert tree_digest(run.target) == before


def test_artifact_directory_of_someone_else_is_refused(client, source_copy, tmp_path):
    """An existing directory with the artifact's name holding files we did not write is left alone
    unless overwrite=True (which replaces its contents, and only its contents)."""
    run = Run(source_copy, tmp_path / "out")
    run.target.mkdir(parents=True)
    (run.target / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match=r"holds files hats-margin did not write \(thesis\.tex\)"):
        pipeline_with_client(run.args(), client)
    assert (run.target / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in run.target.iterdir()) == ["thesis.tex"]


def test_foreign_files_in_the_intermediate_location_are_never_adopted(client, source_copy, tmp_path):
    """tmp_dir/<name>/intermediate already holding a user's files: refused, whatever resume says
    (adopting it would delete it at the clean-up)."""
    run = Run(source_copy, tmp_path / "out", tmp_dir=tmp_path / "tmp")
    run.base.mkdir(parents=True)
    (run.base / "results.csv").write_text("a,b\n")
    for resume in (True, False):
        with pytest.raises(OutputExistsError, match=r"intermediate directory .* holds files hats-margin did not write"):
            pipeline_with_client(run.args(resume=resume, overwrite=True), client)
    assert (run.base / "results.csv").read_text() == "a,b\n"
    assert not (run.target / "hats.properties").exists()


def test_intermediate_of_another_output_is_never_taken(client, baselines, source_copy, tmp_path):
    """Two outputs with the same name and tmp_dir share tmp_dir/<name>/intermediate: the second
    run refuses (even with resume=False) instead of deleting the first's work."""
    first = Run(source_copy, tmp_path / "out_a", tmp_dir=tmp_path / "tmp")
    second = Run(source_copy, tmp_path / "out_b", tmp_dir=tmp_path / "tmp")
    bad = source_copy.joinpath(*BAD_PARTITION)
    saved = tmp_path / "saved.parquet"
    shutil.copyfile(bad, saved)
    bad.write_bytes(b"garbage")
    with pytest.raises(StageFailedError):
        pipeline_with_client(first.args(), client)
    shutil.copyfile(saved, bad)
    before = tree_digest(first.base)
    for resume in (True, False):
        with pytest.raises(OutputExistsError, match=r"belongs to a run writing .*out_a/margin"):
            pipeline_with_client(second.args(resume=resume), client)
    assert tree_digest(first.base) == before
    result = pipeline_with_client(first.args(), client)
    assert result.skipped_tasks["mapping"] == 13
    assert_same_margin(first.target, baselines(False))
    assert not (tmp_path / "out_b" / NAME).joinpath("hats.properties").exists()


def test_failed_run_leaves_no_catalog_and_says_how_to_resume(client, copy_catalog, tmp_path):
    source_copy = copy_catalog("small_sky_source_catalog")
    source_copy.joinpath(*BAD_PARTITION).write_bytes(b"garbage")
    run = Run(source_copy, tmp_path / "out")
    with pytest.raises(StageFailedError, match=r"(?s)Fix the cause and run again with the same arguments to resume"):
        pipeline_with_client(run.args(), client)
    assert not is_valid_catalog(str(run.target))
    assert {p.name for p in run.target.iterdir()} <= {"intermediate", "dataset", ".hats-margin-owner"}


# ------------------------------------------------------------------ issue 13 item 2: only what a run of ours claimed
def test_directory_that_only_looks_like_ours_is_never_cleared(client, source_copy, tmp_path):
    """`mkdir -p u/mydata/dataset; echo precious > u/mydata/dataset/notes.txt` then a build into
    u/mydata deleted notes.txt: entries with our names are not proof that a run of ours wrote them."""
    run = Run(source_copy, tmp_path / "u")
    (run.target / "dataset").mkdir(parents=True)
    (run.target / "dataset" / "notes.txt").write_text("precious")
    (run.target / "partition_info.csv").write_text("mine\n")
    before = tree_digest(run.target)
    for resume in (True, False):
        with pytest.raises(OutputExistsError, match=r"holds files hats-margin did not write \(dataset, partition_info"):
            pipeline_with_client(run.args(resume=resume), client)
    assert tree_digest(run.target) == before
    assert sorted(p.name for p in run.target.iterdir()) == ["dataset", "partition_info.csv"]


def test_hats_import_margin_with_a_missing_key_is_not_replaced(client, source_copy, reference_margins, tmp_path):
    """A margin whose properties lack one key is not a valid catalog, but it is not ours either."""
    run = Run(source_copy, tmp_path / "out")
    shutil.copytree(reference_margins / "small_sky_source_catalog_3600arcs", run.target)
    for name in ("hats.properties", "properties"):
        path = run.target / name
        if path.exists():
            path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                    if not line.startswith("hats_margin_threshold=")))
    before = tree_digest(run.target)
    with pytest.raises(OutputExistsError, match="already contains a catalog; pass overwrite=True"):
        pipeline_with_client(run.args(), client)
    assert tree_digest(run.target) == before


def test_empty_directory_is_claimed_and_the_claim_released_at_the_end(client, baselines, source_copy, tmp_path):
    run = Run(source_copy, tmp_path / "out")
    run.target.mkdir(parents=True)
    pipeline_with_client(run.args(), client)
    assert_same_margin(run.target, baselines(False))
    assert sorted(p.name for p in run.target.iterdir()) == ["dataset", "hats.properties", "partition_info.csv",
                                                            "properties"]


# ------------------------------------------------------------------ issue 13 item 3: the old catalog survives
def catalog_digest(target) -> dict:
    """The catalog's own files (not our staging directory, lock or intermediate files)."""
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*"))
            if p.is_file() and not p.relative_to(target).parts[0].startswith((".hats-margin", "intermediate"))}


def test_failed_overwrite_keeps_the_old_catalog(client, baselines, copy_catalog, tmp_path):
    """--overwrite deleted the old catalog before the new one existed: a failing input left neither."""
    source_copy = copy_catalog("small_sky_source_catalog")
    run = Run(source_copy, tmp_path / "out")
    pipeline_with_client(run.args(margin_threshold=1800.0), client)
    old = catalog_digest(run.target)
    bad = source_copy.joinpath(*BAD_PARTITION)
    saved = tmp_path / "saved.parquet"
    shutil.copyfile(bad, saved)
    bad.write_bytes(b"garbage")
    for resume in (True, False):
        with pytest.raises(StageFailedError):
            pipeline_with_client(run.args(overwrite=True, resume=resume), client)
        assert catalog_digest(run.target) == old
        assert is_valid_catalog(str(run.target), strict=True)
    shutil.copyfile(saved, bad)
    result = pipeline_with_client(run.args(overwrite=True), client)
    assert result.skipped_tasks["mapping"] == 13  # the staged build resumed
    assert_same_margin(run.target, baselines(False))
    assert sorted(p.name for p in run.target.iterdir()) == ["dataset", "hats.properties", "partition_info.csv",
                                                            "properties"]


def test_overwrite_of_files_not_ours_replaces_them_only_at_the_end(client, baselines, copy_catalog, tmp_path):
    source_copy = copy_catalog("small_sky_source_catalog")
    run = Run(source_copy, tmp_path / "out")
    run.target.mkdir(parents=True)
    (run.target / "thesis.tex").write_text("years of work")
    source_copy.joinpath(*BAD_PARTITION).write_bytes(b"garbage")
    with pytest.raises(StageFailedError):
        pipeline_with_client(run.args(overwrite=True), client)
    assert (run.target / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------ issue 13 item 4: every depth
USERS_FILES = ("shards/notes.txt", "shards/2_176/notes.txt", "mapping/mine/deep.txt", "reducing/0_4.json.bak")


@pytest.mark.parametrize(("relative", "owned"), [
    ("mapping/2_176-0123abcd.json", True),  # a batch's done marker (format 3)
    ("mapping/.2_176-0123abcd.json.4242.tmp", True),  # its write cut short (io.write_json's name)
    ("shards/2_176-0123abcd.arrow", True),  # a batch's shard (format 3)
    ("mapping/2_176.json", True), ("shards/2_176.arrow", True),  # format 2, discarded by a fresh start
    ("shards/2_176/1_3.arrow", True),  # format 1
    ("mapping/2_176-0123abc.json", False), ("mapping/2_176-0123ABCD.json", False),
    ("shards/2_176-0123abcd.arrow.bak", False), ("shards/notes-0123abcd.arrow", False),
    ("mapping/2_176-0123abcd.json.bak", False), ("mapping/mine/2_176-0123abcd.json", False),
])
def test_only_names_a_run_writes_are_owned(relative, owned):
    assert TempLayout.owns(relative) is owned


def test_batch_names_a_run_writes_are_owned(tmp_path):
    layout = TempLayout(UPath(tmp_path))
    batch = layout.new_batch((2, 176))
    for path in (layout.map_marker(batch), layout.shard(batch)):
        assert TempLayout.owns(str(path.relative_to(layout.base))), path


def put_users_files(base):
    for relative in USERS_FILES:
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")


def assert_users_files_kept(base):
    for relative in USERS_FILES:
        assert (base / relative).read_text() == "mine", relative
    leftovers = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    assert leftovers == sorted(USERS_FILES), "only the user's files may be left"


def test_users_files_deep_in_the_intermediate_directory_are_kept(client, baselines, copy_catalog, tmp_path, caplog):
    """Ownership was checked on top-level names only: a user's file in tmp_dir/<name>/intermediate/shards/
    was deleted by the clean-up and by resume=False."""
    source_copy = copy_catalog("small_sky_source_catalog")
    run = Run(source_copy, tmp_path / "out", tmp_dir=tmp_path / "tmp")
    bad = source_copy.joinpath(*BAD_PARTITION)
    saved = tmp_path / "saved.parquet"
    shutil.copyfile(bad, saved)
    bad.write_bytes(b"garbage")
    with pytest.raises(StageFailedError):
        pipeline_with_client(run.args(), client)
    put_users_files(run.base)
    with pytest.raises(StageFailedError):  # resume=False discards the run's files, not the user's
        pipeline_with_client(run.args(resume=False), client)
    assert all((run.base / relative).read_text() == "mine" for relative in USERS_FILES)
    shutil.copyfile(saved, bad)
    caplog.set_level(logging.WARNING, logger="hats_margin")
    pipeline_with_client(run.args(), client)  # success: the clean-up keeps them too
    assert_same_margin(run.target, baselines(False))
    assert_users_files_kept(run.base)
    assert any("kept 4 file(s)" in r.message and "hats-margin did not write" in r.message for r in caplog.records)


def test_users_files_deep_in_the_claimed_artifact_directory_are_kept(client, copy_catalog, tmp_path):
    """The same at every depth of output_path/<name>: a run that failed (or was killed) leaves its
    claimed directory; a user's file put in its dataset/ was deleted by the fresh start (resume=False,
    or a re-run with other values), without overwrite."""
    source_copy = copy_catalog("small_sky_source_catalog")
    run = Run(source_copy, tmp_path / "out")
    source_copy.joinpath(*BAD_PARTITION).write_bytes(b"garbage")
    with pytest.raises(StageFailedError):
        pipeline_with_client(run.args(), client)
    notes = run.target / "dataset" / "Norder=2" / "notes.txt"
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("mine")
    with pytest.raises(StageFailedError):
        pipeline_with_client(run.args(resume=False), client)
    assert notes.read_text() == "mine"
    assert [p.name for p in (run.target / "dataset").rglob("*") if p.is_file()] == ["notes.txt"]


# ------------------------------------------------------------------ issue 13 item 3: SIGKILL inside the swap
SWAP_POINTS = [
    pytest.param(2, id="old-half-aside"),
    pytest.param(6, id="new-half-in"),
    pytest.param(4, id="old-all-aside", marks=pytest.mark.slow),
    pytest.param(8, id="all-moved", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("moves", SWAP_POINTS)
def test_overwrite_killed_inside_the_swap_is_completed_by_the_rerun(client, baselines, source_copy, sentinels,
                                                                     tmp_path, moves):
    """A real SIGKILL of an overwrite run after its n-th swap move: neither catalog is lost, and the
    same command run again puts the new catalog in place without rebuilding it."""
    run = Run(source_copy, tmp_path / "out", extra={"overwrite": True})
    pipeline_with_client(run.args(margin_threshold=1800.0), client)  # the old catalog
    finish(spawn(run, tmp_path / "run.log", threads=True, die_at=f"mid-swap:{moves}"), killed=True)
    names = {p.name for p in run.target.iterdir()}
    assert {".hats-margin-new", ".hats-margin-old"} <= names  # both catalogs are on disk
    result = pipeline_with_client(run.args(), client)
    assert result.skipped_tasks == {"mapping": 14, "reducing": len(result.pixels)}  # not rebuilt
    assert_same_margin(run.target, baselines(False))
    assert sorted(p.name for p in run.target.iterdir()) == ["dataset", "hats.properties", "partition_info.csv",
                                                            "properties"]

"""Issue 13, "Messages": every user-facing failure is one line naming the file (or value) and the fix.

Garbage collection.properties and lying hats.properties name the file and the bad key (no
multi-line pydantic dump); a 300-character name is an early ArgumentError; a read-only output
is a one-line error with exit code 2; a stage with many failed partitions is one summary line,
the per-task lines only in the verbose log.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from hats_margin import (
    ArgumentError,
    InputCatalogError,
    MarginCacheArguments,
    StageFailedError,
    cli,
    pipeline_with_client,
)
from hats_margin.errors import StageFailedError as _Stage

SOURCE = "small_sky_source_catalog"


def build(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hats-margin: error: ")
    return lines[0]


# ---------------------------------------------------------------- properties files
@pytest.mark.parametrize(
    ("line", "old", "key"),
    [("hats_nrows=many", "hats_nrows=17161", "hats_nrows"),
     ("dataproduct_type=sauce", "dataproduct_type=source", "dataproduct_type")],
)
def test_lying_hats_properties_is_one_line_naming_file_and_key(capsys, copy_catalog, tmp_path, line, old, key):
    source = copy_catalog(SOURCE)
    for name in ("hats.properties", "properties"):
        path = source / name
        if path.exists():
            path.write_text(path.read_text().replace(old, line))
    code, err = build(["build", str(source), str(tmp_path / "out"), "--dry-run"], capsys)
    message = one_error_line(err)
    assert code == 2 and str(source / "hats.properties") in message and key in message
    assert "errors.pydantic.dev" not in message


@pytest.mark.parametrize(
    ("text", "key"),
    [("obs_collection=c\n", "hats_primary_table_url"),
     ("obs_collection=c\nhats_primary_table_url=cat\nall_margins=a b\ndefault_margin=zzz\n", "default_margin")],
)
def test_garbage_collection_properties_is_one_line_naming_file_and_key(capsys, tmp_path, text, key):
    collection = tmp_path / "coll"
    collection.mkdir()
    (collection / "collection.properties").write_text(text)
    code, err = build(["build", str(collection), str(tmp_path / "out"), "--dry-run"], capsys)
    message = one_error_line(err)
    assert code == 2 and str(collection / "collection.properties") in message and key in message
    assert "errors.pydantic.dev" not in message


# ---------------------------------------------------------------- names
def test_a_300_character_name_is_refused_up_front(tmp_path):
    with pytest.raises(ArgumentError, match=r"output_artifact_name is 300 bytes long.*at most 255"):
        MarginCacheArguments(input_catalog_path=tmp_path, output_path=tmp_path, output_artifact_name="a" * 300)
    assert list(tmp_path.iterdir()) == []


def test_a_255_byte_name_is_accepted():
    args = MarginCacheArguments(input_catalog_path="in", output_path="out", output_artifact_name="a" * 255)
    assert len(args.output_artifact_name) == 255


def test_cli_300_character_name(capsys, catalogs, tmp_path):
    code, err = build(["build", str(catalogs / SOURCE), str(tmp_path), "--name", "n" * 300], capsys)
    assert code == 2 and "at most 255 bytes" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- read-only output
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(capsys, catalogs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, err = build(["build", str(catalogs / SOURCE), str(out), "--no-progress"], capsys)
    finally:
        out.chmod(0o755)
    assert code == 2 and str(out) in one_error_line(err)


def test_permission_denied_while_writing_is_exit_2_naming_the_file(capsys, client, catalogs, tmp_path, monkeypatch):
    """A read-only place met during the run (here: the lock file; as root the test cannot make
    a directory read-only, so the OS error is simulated where it would arise)."""
    from hats_margin import lock

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(lock.OutputLock, "_acquire_local", denied)
    code, err = build(["build", str(catalogs / SOURCE), str(tmp_path), "--name", "m",
                       "--scheduler", client.scheduler.address, "--no-progress"], capsys)
    message = one_error_line(err)
    assert code == 2 and "permission denied on" in message and ".hats-margin.lock" in message
    assert "you can write" in message


# ---------------------------------------------------------------- many failed partitions
def corrupt_all(source):
    files = sorted((source / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    for path in files:
        path.write_bytes(b"not parquet at all")
    return files


def test_many_failed_partitions_make_one_summary_line(capsys, client, copy_catalog, tmp_path, caplog):
    source = copy_catalog(SOURCE)
    files = corrupt_all(source)
    caplog.set_level(logging.WARNING, logger="hats_margin")
    code, err = build(["build", str(source), str(tmp_path), "--name", "m", "--threshold", "3600",
                       "--scheduler", client.scheduler.address, "--no-progress"], capsys)
    message = one_error_line(err)
    assert code == 2
    assert f"{len(files)} mapping task(s) failed: " in message and f"and {len(files) - 5} more" in message
    assert "first: " in message and "--verbose" in message
    assert not [r for r in caplog.records if "task" in r.message and "failed" in r.message]


def test_verbose_shows_each_failed_task(capsys, client, copy_catalog, tmp_path):
    source = copy_catalog(SOURCE)
    files = corrupt_all(source)
    code = cli.main(["build", str(source), str(tmp_path), "--name", "m", "--threshold", "3600", "--verbose",
                     "--scheduler", client.scheduler.address, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    per_task = [line for line in err.splitlines() if "Mapping task" in line and "failed" in line]
    assert len(per_task) == len(files)


def test_stage_error_text_lists_few_failures_in_full():
    failures = {"2_181": ValueError("bad file\nsecond line"), "2_185": OSError("disk")}
    text = str(_Stage("mapping", failures, "Fix the cause and\nrun again."))
    assert text == ("2 mapping task(s) failed: 2_181, 2_185. 2_181: ValueError: bad file second line; "
                    "2_185: OSError: disk. Fix the cause and run again.")


def test_input_error_text_is_one_line(client, copy_catalog, tmp_path):
    source = copy_catalog(SOURCE)
    shutil.rmtree(source / "dataset" / "Norder=2")
    with pytest.raises((InputCatalogError, StageFailedError)) as info:
        pipeline_with_client(MarginCacheArguments(input_catalog_path=source, output_path=tmp_path,
                                                  output_artifact_name="m", progress_bar=False), client)
    assert "\n" not in str(info.value)

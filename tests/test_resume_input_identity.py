"""Issue 13 item 8: a resume never mixes old and new input. The fingerprint covers each partition
file's identity (size and modification time locally, the ETag on object stores), so a
partition edited between a failed run and its re-run is refused, naming the partition."""

from __future__ import annotations

import json
import os

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from upath import UPath

from hats_margin import ResumeMismatchError, StageFailedError, pipeline_with_client
from hats_margin.io import partition_identities
from hats_margin.stages import planning
from test_resume import fail_in_reducing, intermediate, make_args


@pytest.fixture
def setup(copy_catalog, tmp_path):
    """A private copy of the source catalog, and the directories test_resume.make_args uses."""
    source = copy_catalog("small_sky_source_catalog")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out").mkdir()
    return source, tmp_path


EDITED = ("dataset", "Norder=2", "Dir=0", "Npix=176.parquet")


def edit_one_column(path):
    """Same rows, same schema, one column changed: what the issue's user did."""
    table = pq.read_table(path)
    index = table.schema.get_field_index("mag")
    pq.write_table(table.set_column(index, "mag", pc.add(table.column("mag"), 1.0)), path)


def test_an_edited_partition_refuses_to_resume_naming_it(client, setup, monkeypatch):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    edit_one_column(source.joinpath(*EDITED))
    with pytest.raises(ResumeMismatchError) as info:
        pipeline_with_client(make_args(source, root), client)
    message = str(info.value)
    assert "Norder=2/Npix=176" in message and "resume=False" in message
    assert "Npix=177" not in message
    assert not (root / "out" / "margin" / "hats.properties").exists()
    # starting over takes the new rows
    result = pipeline_with_client(make_args(source, root, resume=False), client)
    assert result.total_rows > 0 and not intermediate(root).exists()


def test_a_file_rewritten_with_the_same_bytes_but_a_new_time_is_refused_too(client, setup, monkeypatch):
    """Size and time are the identity locally: a same-size rewrite is caught by its time."""
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    path = source.joinpath(*EDITED)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ResumeMismatchError, match="Norder=2/Npix=176"):
        pipeline_with_client(make_args(source, root), client)


def test_untouched_input_resumes(client, setup, monkeypatch):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    result = pipeline_with_client(make_args(source, root), client)
    assert result.skipped_tasks["mapping"] == 14


def test_identities_come_from_the_one_listing_planning_already_makes(catalogs, monkeypatch):
    """No extra listing and no per-file call on a store that lists: one find() per catalog."""
    path = UPath(catalogs / "small_sky_source_catalog")
    calls = {"find": 0, "info": 0}
    fs_class = type(path.fs)
    real_find, real_info = fs_class.find, fs_class.info

    def counting_find(self, *args, **kwargs):
        calls["find"] += 1
        return real_find(self, *args, **kwargs)

    def counting_info(self, *args, **kwargs):
        calls["info"] += 1
        return real_info(self, *args, **kwargs)

    monkeypatch.setattr(fs_class, "find", counting_find)
    catalog = planning.open_input(path)
    finds_to_open = calls["find"]
    monkeypatch.setattr(fs_class, "info", counting_info)
    identities = partition_identities(catalog.path, catalog.partitions, catalog.npix_suffix, catalog.leaf_identities)
    assert calls["find"] == finds_to_open and calls["info"] == 0
    assert sorted(identities) == sorted(f"{o}_{p}" for o, p in catalog.partitions)
    assert all(identities.values())


def test_a_partition_fixed_before_it_was_ever_mapped_resumes(client, setup, monkeypatch):
    """A corrupt partition fails its map task; fixing it changes its identity, but none of its rows
    were used: the resume takes it and skips the rest. The fixed identity is then recorded."""
    source, root = setup
    path = source.joinpath(*EDITED)
    good = path.read_bytes()
    path.write_bytes(b"not parquet")
    with pytest.raises(StageFailedError, match="2_176"):
        pipeline_with_client(make_args(source, root), client)
    path.write_bytes(good)
    fail_in_reducing(client, make_args(source, root), monkeypatch)  # maps 2_176 now, then stops
    markers = (intermediate(root) / "mapping").glob("*.json")
    assert any("2_176" in json.loads(m.read_text())["tasks"] for m in markers), "2_176 is listed as done"
    edit_one_column(path)  # after its rows were read: refused
    with pytest.raises(ResumeMismatchError, match="Norder=2/Npix=176"):
        pipeline_with_client(make_args(source, root), client)
    path.write_bytes(good)  # same bytes, new time: still not the file that was read
    with pytest.raises(ResumeMismatchError, match="Norder=2/Npix=176"):
        pipeline_with_client(make_args(source, root), client)


def test_fixing_an_unmapped_partition_then_resuming_skips_the_others(client, setup):
    source, root = setup
    path = source.joinpath(*EDITED)
    good = path.read_bytes()
    path.write_bytes(b"not parquet")
    with pytest.raises(StageFailedError, match="2_176"):
        pipeline_with_client(make_args(source, root), client)
    path.write_bytes(good)
    result = pipeline_with_client(make_args(source, root), client)
    assert result.skipped_tasks["mapping"] == 13 and result.total_rows > 0

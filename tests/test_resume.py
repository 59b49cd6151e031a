"""A resume never mixes runs, and work already done is not redone.

The intermediate directory records a fingerprint of everything that determines the output.
A re-run with any other value refuses with ResumeMismatchError naming the value and saying
``resume=False``, before touching anything; ``resume=False`` starts over, deleting only this
run's own intermediate files. A directory whose deletion was cut short (no run.json) is never
resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from hats.catalog import TableProperties
from hats.io.validation import is_valid_catalog

from hats_margin import MarginCacheArguments, ResumeMismatchError, StageFailedError, pipeline_with_client
from hats_margin.stages import mapping, reducing
from helpers import tree_checksum

NAME = "margin"


digest = tree_checksum


def rows(catalog: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    return {
        str(p.relative_to(catalog)): pq.read_metadata(p).num_rows
        for p in sorted(Path(catalog, "dataset").rglob("Npix=*")) if p.is_file()
    }


@pytest.fixture
def setup(copy_catalog, tmp_path):
    source = copy_catalog("small_sky_source_catalog")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "users_file.txt").write_text("keep")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "beside.txt").write_text("keep")
    yield source, tmp_path
    assert (tmp_path / "tmp" / "users_file.txt").read_text() == "keep"
    assert (tmp_path / "out" / "beside.txt").read_text() == "keep"


def make_args(source, root, **kwargs) -> MarginCacheArguments:
    values = {
        "input_catalog_path": str(source),
        "output_path": str(root / "out"),
        "output_artifact_name": NAME,
        "margin_threshold": 3600.0,
        "fine_filtering": False,
        "progress_bar": False,
        "tmp_dir": str(root / "tmp"),
    }
    values.update(kwargs)
    return MarginCacheArguments(**values)


def intermediate(root) -> Path:
    return root / "tmp" / NAME / "intermediate"


def fail_in_reducing(client, args, monkeypatch):
    """Run until every map task is done, then fail every reduce task."""

    def broken(task, *rest):
        raise RuntimeError("simulated reduce failure")

    with monkeypatch.context() as patch:
        patch.setattr(reducing, "reduce_pixel", broken)
        with pytest.raises(StageFailedError, match="reducing"):
            pipeline_with_client(args, client)


CHANGES = [
    ("margin_threshold", {"margin_threshold": 1800.0}),
    ("margin_order", {"margin_order": 4}),  # coarser: 6 would be refused (cells narrower than 3600")
    ("fine_filtering", {"fine_filtering": True}),
    ("npix_suffix", {"npix_suffix": "/"}),
    ("npix_parquet_name", {"npix_suffix": "/", "npix_parquet_name": "part0.parquet"}),
    ("create_metadata", {"create_metadata": False}),
    ("write_table_kwargs", {"write_table_kwargs": {"compression": "snappy"}}),
    ("addl_hats_properties", {"addl_hats_properties": {"obs_regime": "Optical"}}),
]
# (another output sharing tmp_dir/<name> is refused even with resume=False:
# tests/reliability/test_ownership.py::test_intermediate_of_another_output_is_never_taken)


@pytest.mark.parametrize(("key", "change"), CHANGES, ids=[k for k, _ in CHANGES])
def test_changed_value_refuses_to_resume(client, setup, monkeypatch, key, change):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    before = digest(intermediate(root))
    with pytest.raises(ResumeMismatchError) as info:
        pipeline_with_client(make_args(source, root, **change), client)
    message = str(info.value)
    assert re.search(rf"\b{key} \(was .*, now .*\)", message), message
    assert "resume=False" in message
    assert digest(intermediate(root)) == before, "a refused resume must not touch the intermediate files"
    assert not (root / "out" / NAME / "hats.properties").exists()


def test_changed_input_catalog_refuses_to_resume(client, setup, monkeypatch, tmp_path):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    # the same catalog at another path, with one partition fewer
    other = tmp_path / "inputs" / "other_copy"
    shutil.copytree(source, other)
    (other / "dataset" / "Norder=2" / "Dir=0" / "Npix=187.parquet").unlink()
    info_csv = other / "partition_info.csv"
    info_csv.write_text("\n".join(line for line in info_csv.read_text().splitlines() if line != "2,187") + "\n")
    (other / "dataset" / "_metadata").unlink()
    with pytest.raises(ResumeMismatchError) as info:
        pipeline_with_client(make_args(other, root), client)
    message = str(info.value)
    assert "input_catalog_path (was" in message and "input_partitions (was" in message and "resume=False" in message


def test_resume_false_starts_over_deleting_only_its_own_files(client, setup, monkeypatch):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    stale_shards = sorted((intermediate(root) / "shards").rglob("*.arrow"))
    assert stale_shards
    result = pipeline_with_client(make_args(source, root, margin_threshold=1800.0, resume=False), client)
    assert result.skipped_tasks == {"mapping": 0, "reducing": 0}
    assert result.margin_threshold == 1800.0
    assert is_valid_catalog(str(root / "out" / NAME), strict=True)
    assert not intermediate(root).exists()
    assert sorted(p.name for p in (root / "tmp").iterdir()) == ["users_file.txt"]
    assert sorted(p.name for p in (root / "out").iterdir()) == ["beside.txt", NAME]


def test_same_values_resume_without_redoing_work(client, setup, monkeypatch, caplog):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    log = root / "map_calls.txt"
    real = mapping.map_partition

    def spy(task, *args):
        # Dask pickles the task function: a list in its closure would be a copy, always empty
        with open(log, "a") as handle:
            handle.write(task.key + "\n")
        return real(task, *args)

    monkeypatch.setattr(mapping, "map_partition", spy)
    caplog.set_level(logging.INFO, logger="hats_margin")
    result = pipeline_with_client(make_args(source, root), client)
    assert not log.exists(), f"map tasks done by the failed run were run again: {log.read_text().split()}"
    assert result.skipped_tasks == {"mapping": 14, "reducing": 0}
    assert any("Mapping: 14 task(s) done in an earlier run, skipped" in r.message for r in caplog.records)
    assert is_valid_catalog(str(root / "out" / NAME), strict=True)


def test_progress_bar_says_how_many_tasks_were_skipped(client, setup, monkeypatch, capsys):
    source, root = setup
    fail_in_reducing(client, make_args(source, root), monkeypatch)
    capsys.readouterr()
    pipeline_with_client(make_args(source, root, progress_bar=True), client)
    assert "(14 done earlier, skipped)" in capsys.readouterr().err


def test_cut_short_deletion_is_never_resumed(client, setup, monkeypatch):
    """A deletion of the intermediate files cut short (run.json goes first, then some shards) leaves
    markers whose shards are gone: the next run must start over, not trust those markers."""
    source, root = setup
    args = make_args(source, root)
    fail_in_reducing(client, args, monkeypatch)
    (intermediate(root) / "run.json").unlink()
    for shard in sorted((intermediate(root) / "shards").rglob("*.arrow"))[::2]:
        shard.unlink()
    result = pipeline_with_client(args, client)
    assert result.skipped_tasks == {"mapping": 0, "reducing": 0}
    assert sum(rows(root / "out" / NAME).values()) == result.total_rows > 0
    assert is_valid_catalog(str(root / "out" / NAME), strict=True)


def test_unreadable_run_json_starts_over(client, setup, monkeypatch):
    source, root = setup
    args = make_args(source, root)
    fail_in_reducing(client, args, monkeypatch)
    (intermediate(root) / "run.json").write_text("{ half a json")
    result = pipeline_with_client(args, client)
    assert result.skipped_tasks == {"mapping": 0, "reducing": 0}
    assert is_valid_catalog(str(root / "out" / NAME), strict=True)


def test_fingerprint_is_recorded_before_any_task(client, setup, monkeypatch):
    """Each map task, when it starts, already finds run.json holding this run's values."""
    source, root = setup
    args = make_args(source, root)
    run_json = intermediate(root) / "run.json"
    log = root / "map_calls.jsonl"
    real = mapping.map_partition

    def spy(task, *args):
        # Dask pickles the task function (a copied list would stay empty): report through a file
        fingerprint = json.loads(run_json.read_text())["fingerprint"] if run_json.exists() else None
        with open(log, "a") as handle:
            handle.write(json.dumps(fingerprint) + "\n")
        return real(task, *args)

    monkeypatch.setattr(mapping, "map_partition", spy)
    pipeline_with_client(args, client)
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(seen) == 14 and None not in seen, "a map task ran before run.json was written"
    recorded = seen[0]
    assert all(fingerprint == recorded for fingerprint in seen)
    expected = {
        "input_catalog_path": str(source),
        "output": str(root / "out" / NAME),
        "input_rows": TableProperties.read_from_dir(source).total_rows,
        "margin_threshold": 3600.0,
        "margin_order": args.margin_order,
        "fine_filtering": False,
        "npix_suffix": ".parquet",
        "create_metadata": True,
    }
    assert {key: recorded.get(key) for key in expected} == expected
    for key in ("input_partitions", "input_schema", "write_table_kwargs", "addl_hats_properties"):
        assert isinstance(recorded.get(key), str) and recorded[key], key  # digests


def test_same_paths_spelled_differently_resume(client, setup, monkeypatch):
    """Issue 13 item 13: a run on relative paths resumed with their absolute spelling (and a
    trailing '/.') was refused as 'belongs to a run writing out/margin, not /abs/out/margin'."""
    source, root = setup
    monkeypatch.chdir(root)
    relative = make_args(Path(os.path.relpath(source, root)), root, output_path="out", tmp_dir="tmp")
    fail_in_reducing(client, relative, monkeypatch)
    absolute = make_args(f"{source}/.", root, output_path=f"{root}/out/", tmp_dir=f"{root}//tmp")
    result = pipeline_with_client(absolute, client)
    assert result.skipped_tasks == {"mapping": 14, "reducing": 0}
    assert is_valid_catalog(str(root / "out" / NAME), strict=True)

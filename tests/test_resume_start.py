"""How a run starts: the resume owner hands the orchestrator the done map tasks only when resuming."""

import pytest
from upath import UPath

from hats_margin.io import INTERMEDIATE_FORMAT, TempLayout, write_json
from hats_margin.resume import COMPLETE, FRESH, RESUME, Start, done_maps


@pytest.fixture
def layout(tmp_path):
    layout = TempLayout(UPath(tmp_path / "intermediate"))
    layout.make_dirs()
    write_json(layout.map_marker("0_4-0000000a"), marker("0_4-0000000a", [(0, 4), (1, 17)]))
    # the same batch re-run by Dask after its worker died past the marker: a second, equal listing
    write_json(layout.map_marker("0_4-0000000b"), marker("0_4-0000000b", [(0, 4)]))
    write_json(layout.map_marker("1_18-0000000c"), marker("1_18-0000000c", [(1, 18)], INTERMEDIATE_FORMAT - 1))
    (layout.base / "mapping" / "notes.txt").write_text("not a marker")
    (layout.base / "mapping" / "1_19-0000000d.json").write_text('{"format": 3, "tas')  # cut short
    return layout


def marker(batch, sources, fmt=INTERMEDIATE_FORMAT):
    return {"format": fmt, "shard": batch,
            "tasks": {f"{o}_{p}": {"source": [o, p], "shard": batch, "rows": {}} for o, p in sources}}


def test_done_maps_are_the_tasks_listed_in_batch_markers(layout):
    done = done_maps(layout)
    assert set(done) == {"0_4", "1_17"}, "another format's marker, a cut-short one and a user's file are ignored"
    assert done["0_4"]["shard"] == "0_4-0000000a", "a task listed twice is taken from the first marker"


def test_done_maps_of_a_directory_not_made_yet_are_empty(tmp_path):
    assert done_maps(TempLayout(UPath(tmp_path / "none"))) == {}


@pytest.mark.parametrize("kind, expected", [(RESUME, {"0_4", "1_17"}), (FRESH, set()), (COMPLETE, set())])
def test_only_a_resumed_start_skips_done_tasks(layout, tmp_path, kind, expected):
    start = Start(kind, lock=None, layout=layout, build_path=UPath(tmp_path / "out"))
    assert set(start.done_maps()) == expected
    assert start.complete == (kind == COMPLETE)
    if kind != RESUME:
        assert start.done_reduces([object()]) == set()  # nothing is read unless resuming

"""How a run starts: the resume owner hands the orchestrator the done keys only when resuming."""

import pytest
from upath import UPath

from hats_margin.io import TempLayout, write_json
from hats_margin.resume import COMPLETE, FRESH, RESUME, Start, done_maps


@pytest.fixture
def layout(tmp_path):
    layout = TempLayout(UPath(tmp_path / "intermediate"))
    layout.make_dirs()
    write_json(layout.map_marker(0, 4), {"source": [0, 4]})
    write_json(layout.map_marker(1, 17), {"source": [1, 17]})
    (layout.base / "mapping" / "notes.txt").write_text("not a marker")
    return layout


def test_done_maps_are_the_marker_names(layout):
    assert done_maps(layout) == {"0_4", "1_17"}


def test_done_maps_of_a_directory_not_made_yet_are_empty(tmp_path):
    assert done_maps(TempLayout(UPath(tmp_path / "none"))) == set()


@pytest.mark.parametrize("kind, expected", [(RESUME, {"0_4", "1_17"}), (FRESH, set()), (COMPLETE, set())])
def test_only_a_resumed_start_skips_done_tasks(layout, tmp_path, kind, expected):
    start = Start(kind, lock=None, layout=layout, build_path=UPath(tmp_path / "out"))
    assert start.done_maps() == expected
    assert start.complete == (kind == COMPLETE)
    if kind != RESUME:
        assert start.done_reduces([object()]) == set()  # nothing is read unless resuming

"""How a run starts: the resume owner hands the orchestrator the done keys only when resuming."""

import pytest
from upath import UPath

from hats_margin.io import TempLayout, write_json
from hats_margin.resume import COMPLETE, FRESH, RESUME, Start, done_keys


@pytest.fixture
def layout(tmp_path):
    layout = TempLayout(UPath(tmp_path / "intermediate"))
    layout.make_dirs()
    write_json(layout.map_marker(0, 4), {"source": [0, 4]})
    write_json(layout.map_marker(1, 17), {"source": [1, 17]})
    write_json(layout.reduce_marker(2, 70), {})
    (layout.base / "mapping" / "notes.txt").write_text("not a marker")
    return layout


def test_done_keys_are_the_marker_names_of_a_stage(layout):
    assert done_keys(layout, "mapping") == {"0_4", "1_17"}
    assert done_keys(layout, "reducing") == {"2_70"}


def test_done_keys_of_a_directory_not_made_yet_are_empty(tmp_path):
    assert done_keys(TempLayout(UPath(tmp_path / "none")), "mapping") == set()


@pytest.mark.parametrize("kind, expected", [(RESUME, {"0_4", "1_17"}), (FRESH, set()), (COMPLETE, set())])
def test_only_a_resumed_start_skips_done_tasks(layout, kind, expected):
    start = Start(kind, lock=None, layout=layout)
    assert start.done("mapping") == expected
    assert start.complete == (kind == COMPLETE)

"""The map stage decodes a large row group's other columns in a background thread while the exact
test runs (mapping.PREFETCH_MIN_PAIRS), and a very large one a group of columns at a time
(mapping.LARGE_ROW_GROUP_BYTES): the margin must be the same, row for row, as without either, also
when the test then rejects every candidate (the decode is waited for and dropped)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from hats_margin import MarginCacheArguments, pipeline
from hats_margin.stages import mapping


def _build(catalogs, out, threshold, **kwargs):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / "small_sky_source_catalog", output_path=out, output_artifact_name="m",
        margin_threshold=threshold, progress_bar=False, **kwargs,  # one worker: in this process, so patches apply
    )
    return pipeline(args).catalog_path


def _rows(catalog) -> dict[str, list]:
    files = sorted((catalog / "dataset").rglob("Npix=*"))
    return {f.name: pq.read_table(f).to_pylist() for f in files}


@pytest.mark.parametrize("threshold", [10.0, 0.02, 600.0])
def test_prefetching_the_other_columns_changes_no_row(catalogs, tmp_path, monkeypatch, threshold):
    events = {"submitted": 0, "abandoned": 0}
    prefetch, abandon = mapping._RowGroup.prefetch, mapping._RowGroup.abandon

    def counting_prefetch(self, names):
        prefetch(self, names)
        events["submitted"] += self._pending is not None

    def counting_abandon(self):
        events["abandoned"] += self._pending is not None
        abandon(self)

    monkeypatch.setattr(mapping, "PREFETCH_MIN_PAIRS", 10**12)  # never
    without = _rows(_build(catalogs, tmp_path / "without", threshold))
    # every row group counts as large, and any candidate starts a background decode
    monkeypatch.setattr(mapping, "SMALL_ROW_GROUP_BYTES", -1)
    monkeypatch.setattr(mapping, "PREFETCH_MIN_PAIRS", 1)
    monkeypatch.setattr(mapping._RowGroup, "prefetch", counting_prefetch)
    monkeypatch.setattr(mapping._RowGroup, "abandon", counting_abandon)
    with_prefetch = _rows(_build(catalogs, tmp_path / "with", threshold))
    assert with_prefetch == without
    assert events["submitted"] > 0
    if threshold == 0.02:  # candidates whose rows are all farther than 0.02": decodes dropped
        assert events["abandoned"] > 0


def test_a_failing_background_decode_is_reported_when_its_columns_are_needed(catalogs, tmp_path, monkeypatch):
    monkeypatch.setattr(mapping, "SMALL_ROW_GROUP_BYTES", -1)
    monkeypatch.setattr(mapping, "PREFETCH_MIN_PAIRS", 1)

    def broken(self, missing):
        if len(missing) > 3:  # the other columns, not the index and ra/dec
            raise OSError("disk gone")
        return decode(self, missing)

    decode = mapping._RowGroup._decode
    monkeypatch.setattr(mapping._RowGroup, "_decode", broken)
    with pytest.raises(Exception, match="disk gone"):
        _build(catalogs, tmp_path / "out", 10.0)


@pytest.mark.parametrize("fine_filtering", [True, False])
@pytest.mark.parametrize("group_bytes", [1, 20_000])
def test_decoding_a_few_columns_at_a_time_changes_no_row(catalogs, tmp_path, monkeypatch, fine_filtering,
                                                          group_bytes):
    decoded = []
    decode = mapping._RowGroup._decode

    def recording_decode(self, missing):
        decoded.append(len(missing))
        return decode(self, missing)

    whole = _rows(_build(catalogs, tmp_path / "whole", 60.0, fine_filtering=fine_filtering))
    monkeypatch.setattr(mapping, "SMALL_ROW_GROUP_BYTES", -1)
    monkeypatch.setattr(mapping, "LARGE_ROW_GROUP_BYTES", -1)  # every row group is large
    monkeypatch.setattr(mapping, "COLUMN_GROUP_BYTES", group_bytes)  # 1: one column per decode
    monkeypatch.setattr(mapping, "PREFETCH_MIN_PAIRS", 1)
    monkeypatch.setattr(mapping._RowGroup, "_decode", recording_decode)
    grouped = _rows(_build(catalogs, tmp_path / "grouped", 60.0, fine_filtering=fine_filtering))
    assert grouped == whole
    if group_bytes == 1:  # one column per decode, but the first read of the index (and ra/dec)
        assert set(decoded) == ({1, 3} if fine_filtering else {1})

"""The verifier: clean margins pass, each kind of damage is caught, reference margins show coarse extras."""

from __future__ import annotations

import shutil

import cdshealpix.nested as cds
import hats
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hats_margin import MarginCacheArguments, cli, pipeline_with_client
from hats_margin.pixel_distance import within_threshold_of_pixel
from hats_margin.testing.synthetic import THREE_PIXEL_VERTICES_DEG, spatial_index
from hats_margin.verify import verify_margin

SOURCE = "small_sky_source_catalog"

# reference margin, primary, extras the coarse importer margin holds beyond the exact one
REFERENCE_CASES = [
    ("small_sky_object_catalog_3600arcs", "small_sky_object_catalog", 0),
    ("small_sky_source_catalog_10arcs", SOURCE, 34),
    ("small_sky_source_catalog_180arcs", SOURCE, 536),
    ("small_sky_source_catalog_3600arcs", SOURCE, 3678),
    ("small_sky_source_npix_dir_catalog_180arcs", "small_sky_source_npix_dir_catalog", 536),
    ("small_sky_order1_3600arcs", "small_sky_order1_collection/small_sky_order1", 10),
]


def build(client, catalogs, out, name, primary=SOURCE, **kwargs):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / primary,
        output_path=out,
        output_artifact_name=name,
        progress_bar=False,
        **kwargs,
    )
    pipeline_with_client(args, client)
    return out / name


@pytest.fixture(scope="module")
def margins(client, catalogs, tmp_path_factory):
    """Margins of the source catalog built once: exact at several thresholds, one coarse."""
    out = tmp_path_factory.mktemp("margins")
    built = {
        f"exact_{t:g}": build(client, catalogs, out, f"exact_{t:g}", margin_threshold=t, allow_extreme_threshold=t > 36000)
        for t in (10, 180, 40000)
    }
    built["coarse_180"] = build(
        client, catalogs, out, "coarse_180", margin_threshold=180.0, fine_filtering=False
    )
    return built


@pytest.fixture
def damaged(margins, tmp_path):
    """A private copy of the exact 180 arcsec margin, to damage."""
    target = tmp_path / "damaged"
    shutil.copytree(margins["exact_180"], target)
    return target


def _assert_clean(report):
    assert report.missing == 0, report.summary()
    assert report.altered == 0, report.summary()
    assert report.duplicates == 0, report.summary()
    assert report.structural == [], report.summary()


# ------------------------------------------------------------------------ clean margins
@pytest.mark.parametrize("name", ["exact_10", "exact_180", "exact_40000"])
def test_exact_margins_have_no_missing_and_no_extra_row(margins, name):
    report = verify_margin(margins[name])  # primary from hats_primary_table_url
    _assert_clean(report)
    assert report.exact and report.extra == 0 and report.ok
    assert report.rows_expected == report.rows_in_margin > 0


def test_coarse_margin_has_only_extras_and_passes(margins):
    report = verify_margin(margins["coarse_180"])
    _assert_clean(report)
    assert not report.exact, "hats_margin_fine_filtering=false makes extras allowed"
    assert report.extra > 0 and report.max_extra_distance_ratio > 1
    assert report.ok
    assert not verify_margin(margins["coarse_180"], exact=True).ok


@pytest.mark.parametrize("threshold", [10.0, 180.0, 40000.0])
def test_expected_rows_match_a_brute_force_over_every_row_and_pixel(margins, catalogs, threshold):
    """No candidate search at all: every primary row against every destination pixel."""
    report = verify_margin(margins[f"exact_{threshold:g}"])
    primary = hats.read_hats(catalogs / SOURCE)
    tiles = list(primary.get_healpix_pixels()) + list(primary.generate_negative_tree_pixels())
    table = pq.read_table(catalogs / SOURCE / "dataset", columns=["_healpix_29", "source_ra", "source_dec"])
    spidx = table["_healpix_29"].to_numpy()
    ra, dec = table["source_ra"].to_numpy(), table["source_dec"].to_numpy()
    for tile in tiles:
        outside = (spidx >> (2 * (29 - tile.order))) != tile.pixel
        count = int(
            within_threshold_of_pixel(ra[outside], dec[outside], tile.order, tile.pixel, threshold).sum()
        )
        found = report.per_pixel.get((tile.order, tile.pixel), {}).get("expected", 0)
        assert found == count, (tile, threshold)


def test_batches_give_the_same_answer_as_one_pass(margins):
    whole = verify_margin(margins["coarse_180"])
    batched = verify_margin(margins["coarse_180"], max_rows_in_memory=50)
    assert batched.per_pixel == whole.per_pixel
    assert (batched.missing, batched.extra, batched.rows_expected) == (
        whole.missing,
        whole.extra,
        whole.rows_expected,
    )


def _order12_nested_copy(source, target):
    """The source catalog with its spatial index at order 12 (many rows share a value, column
    last) and two nested columns."""
    shutil.copytree(source, target)
    schema = None
    for file in (target / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"):
        table = pq.ParquetFile(file).read()
        n = table.num_rows
        table = table.append_column("hp12", pa.array(table["_healpix_29"].to_numpy() >> 34))
        table = table.drop_columns(["_healpix_29"])
        table = table.append_column(
            "tags", pa.array([[i % 3, i % 5] for i in range(n)], type=pa.list_(pa.int32()))
        )
        table = table.append_column("info", pa.array([{"x": i / 7, "s": str(i)} for i in range(n)]))
        pq.write_table(table, file)
        schema = table.schema
    pq.write_metadata(schema, target / "dataset" / "_common_metadata")
    (target / "dataset" / "_metadata").unlink()
    for name in ("hats.properties", "properties"):
        text = (target / name).read_text()
        text = text.replace("hats_col_healpix=_healpix_29", "hats_col_healpix=hp12")
        (target / name).write_text(text.replace("hats_col_healpix_order=29", "hats_col_healpix_order=12"))
    return target


@pytest.mark.parametrize("fine_filtering", [True, False], ids=["exact", "coarse"])
def test_order12_spatial_index_and_nested_columns(client, catalogs, tmp_path, fine_filtering):
    primary = _order12_nested_copy(catalogs / SOURCE, tmp_path / "primary")
    margin = build(
        client,
        catalogs,
        tmp_path,
        "margin",
        primary=primary,
        margin_threshold=3600.0,  # primary is absolute
        fine_filtering=fine_filtering,
    )
    report = verify_margin(margin)
    _assert_clean(report)
    assert report.rows_expected == 4860  # as with the order-29 index
    assert report.extra == (0 if fine_filtering else 3678)
    # a changed nested value is caught
    file = min((margin / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    table = _read(file)
    tags = table["tags"].to_pylist()
    tags[0] = [7, 7]
    tags = pa.array(tags, pa.list_(pa.int32()))
    table = table.set_column(table.schema.get_field_index("tags"), table.schema.field("tags"), tags)
    pq.write_table(table, file)
    report = verify_margin(margin)
    assert report.altered == 1 and report.missing == 0 and report.altered_examples[0]["differs"] == "tags"


def test_an_empty_margin_verifies(client, catalogs, tmp_path):
    margin = build(
        client, catalogs, tmp_path, "empty", primary="small_sky_object_catalog", margin_threshold=0.5
    )
    report = verify_margin(margin)
    assert report.ok and report.pixels == report.rows_in_margin == report.rows_expected == 0, report.summary()


def _ring(cell, order, steps):
    found = {int(cell)}
    for _ in range(steps):
        neighbours = cds.neighbours(np.array(sorted(found), dtype=np.uint64), order).ravel()
        found |= {int(c) for c in neighbours if c >= 0}
    return found


def test_the_ring_nesting_the_candidate_search_relies_on():
    """The 2-ring of a cell lies in the 1-ring and in the 2-ring of its parent (poles and
    three-base-pixel vertices included)."""
    rng = np.random.default_rng(1)
    vertices = np.array(THREE_PIXEL_VERTICES_DEG)
    ra = np.concatenate(
        [rng.uniform(0, 360, 60), vertices[:, 0] + 1e-9, vertices[:, 0] - 1e-9, [0, 90, 0, 270]]
    )
    dec = np.concatenate(
        [
            np.degrees(np.arcsin(rng.uniform(-1, 1, 60))),
            vertices[:, 1] + 1e-9,
            vertices[:, 1] - 1e-9,
            [90, 90, -90, -90],
        ]
    )
    for order in (1, 2, 5, 9):
        cells = spatial_index(ra, dec) >> (2 * (29 - order))
        for cell in cells:
            children = {c >> 2 for c in _ring(cell, order, 2)}
            assert children <= _ring(cell >> 2, order - 1, 1)
            assert children <= _ring(cell >> 2, order - 1, 2)


# ------------------------------------------------------------------------ reference margins
@pytest.mark.parametrize(
    ("reference", "primary", "extras"), REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES]
)
def test_reference_margins_have_no_missing_row_and_coarse_extras(
    reference_margins, catalogs, reference, primary, extras
):
    report = verify_margin(reference_margins / reference, catalogs / primary)
    _assert_clean(report)
    assert not report.exact and report.ok
    assert report.extra == extras
    if extras:
        assert 1 < report.max_extra_distance_ratio < 4, "a coarse margin reaches about 3x the threshold"
        assert report.extra_examples[0]["distance_ratio"] == pytest.approx(report.max_extra_distance_ratio)


# ------------------------------------------------------------------------ damage
def _file(margin, order, pixel):
    return (
        margin / "dataset" / f"Norder={order}" / f"Dir={(pixel // 10000) * 10000}" / f"Npix={pixel}.parquet"
    )


def _largest_pixel(margin):
    files = sorted(
        (margin / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"),
        key=lambda f: -pq.read_metadata(f).num_rows,
    )
    order = int(files[0].parts[-3].split("=")[1])
    pixel = int(files[0].name.split("=")[1].split(".")[0])
    return order, pixel, files[0]


def _read(path):
    return pq.ParquetFile(path).read()


def _primary_row_far_from(catalogs, order, pixel):
    """A primary row from the partition whose centre is farthest from the pixel."""
    primary = hats.read_hats(catalogs / SOURCE)

    def center(o, p):
        lon, lat = cds.healpix_to_lonlat(np.array([p], dtype=np.uint64), o)
        return np.radians(lon.value[0]), np.radians(lat.value[0])

    lon0, lat0 = center(order, pixel)

    def separation(p):
        lon, lat = center(p.order, p.pixel)
        return np.arccos(np.sin(lat) * np.sin(lat0) + np.cos(lat) * np.cos(lat0) * np.cos(lon - lon0))

    far = max(primary.get_healpix_pixels(), key=separation)
    return _read(_file(catalogs / SOURCE, far.order, far.pixel)).slice(0, 1)


def test_a_deleted_row_is_missing(damaged, client):
    order, pixel, path = _largest_pixel(damaged)
    table = _read(path)
    pq.write_table(table.slice(1), path)
    report = verify_margin(damaged)
    assert report.missing == 1 and report.extra == 0 and report.altered == 0
    assert not report.ok
    assert report.missing_examples[0]["pixel"] == f"{order}/{pixel}"
    assert report.missing_examples[0]["spatial_index"] == table["_healpix_29"][0].as_py()
    assert 0 <= report.missing_examples[0]["distance_ratio"] <= 1
    assert any("hats_nrows" in s for s in report.structural)
    assert cli.main(["verify", str(damaged), "--scheduler", client.scheduler.address]) == 1


def test_an_added_far_row_is_extra(damaged, catalogs):
    order, pixel, path = _largest_pixel(damaged)
    far = _primary_row_far_from(catalogs, order, pixel)
    pq.write_table(pa.concat_tables([_read(path), far]), path)
    report = verify_margin(damaged)
    assert report.extra == 1 and report.missing == 0 and report.altered == 0
    assert report.max_extra_distance_ratio > 10
    assert report.extra_examples[0]["spatial_index"] == far["_healpix_29"][0].as_py()
    assert not report.ok  # the margin says it is exact
    assert verify_margin(damaged, exact=False).extra == 1


def test_a_modified_value_is_altered(damaged, client):
    order, pixel, path = _largest_pixel(damaged)
    table = _read(path)
    mag = table["mag"].to_numpy().copy()
    mag[0] += 0.5
    table = table.set_column(table.schema.get_field_index("mag"), table.schema.field("mag"), pa.array(mag))
    pq.write_table(table, path)
    report = verify_margin(damaged)
    assert report.altered == 1 and report.missing == 0 and report.extra == 0
    assert report.altered_examples[0]["differs"] == "mag"
    assert report.altered_examples[0]["pixel"] == f"{order}/{pixel}"
    assert not report.ok
    assert cli.main(["verify", str(damaged), "--scheduler", client.scheduler.address]) == 1


def test_a_duplicated_row_is_reported(damaged, client):
    _, _, path = _largest_pixel(damaged)
    table = _read(path)
    pq.write_table(pa.concat_tables([table, table.slice(3, 1)]), path)
    report = verify_margin(damaged)
    assert report.duplicates == 1 and report.missing == 0 and report.extra == 0 and report.altered == 0
    assert not report.ok


def test_a_row_of_the_pixel_itself_is_extra_and_structural(damaged, catalogs):
    order, pixel, path = _largest_pixel(damaged)
    own = _read(_file(catalogs / SOURCE, order, pixel)).slice(0, 1)
    pq.write_table(pa.concat_tables([_read(path), own]), path)
    report = verify_margin(damaged, exact=False)
    assert report.extra == 1 and report.self_rows == 1
    assert any("inside the very pixel" in s for s in report.structural)
    assert not report.ok


def test_a_pixel_that_is_not_a_partition_nor_negative_is_structural(damaged):
    order, pixel, path = _largest_pixel(damaged)
    child = pixel * 4
    target = _file(damaged, order + 1, child)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)
    report = verify_margin(damaged)
    assert any(f"pixel {order + 1}/{child}" in s and "neither a partition" in s for s in report.structural)
    assert not report.ok


def test_wrong_hats_nrows_is_structural(damaged, client):
    for name in ("hats.properties", "properties"):
        props = damaged / name
        lines = [
            "hats_nrows=12345" if line.startswith("hats_nrows=") else line
            for line in props.read_text().splitlines()
        ]
        props.write_text("\n".join(lines) + "\n")
    report = verify_margin(damaged)
    assert report.missing == report.extra == report.altered == 0
    assert any("hats_nrows=12345" in s for s in report.structural)
    assert not report.ok
    assert cli.main(["verify", str(damaged), "--scheduler", client.scheduler.address]) == 1


def test_a_changed_column_type_is_structural_and_altered(damaged, client):
    order, pixel, path = _largest_pixel(damaged)
    table = _read(path)
    index = table.schema.get_field_index("mag")
    table = table.set_column(index, pa.field("mag", pa.float32()), table["mag"].cast(pa.float32()))
    pq.write_table(table, path)
    report = verify_margin(damaged)
    assert any(f"pixel {order}/{pixel}: schema differs" in s and "mag: float" in s for s in report.structural)
    assert not report.ok


def test_partition_info_that_differs_from_the_files_is_structural(damaged):
    order, pixel, _ = _largest_pixel(damaged)
    info = damaged / "partition_info.csv"
    info.write_text("".join(line for line in info.open() if line.strip() != f"{order},{pixel}"))
    report = verify_margin(damaged)
    assert any("not in partition_info.csv" in s for s in report.structural)


def test_command_line_passes_a_clean_margin(margins, catalogs, capsys, client):
    assert cli.main(["verify", str(margins["exact_180"]), "--primary", str(catalogs / SOURCE),
                     "--scheduler", client.scheduler.address]) == 0
    assert "result   OK" in capsys.readouterr().out


# ------------------------------------------------------------------------ wrong primary (issue 10)
def test_a_margin_of_another_primary_stops_with_one_message(margins, catalogs, client, capsys):
    other = catalogs / "small_sky_object_catalog"
    report = verify_margin(margins["exact_180"], other)
    assert len(report.structural) == 1, report.summary()
    message = report.structural[0]
    assert "records another primary" in message and "small_sky_source_catalog" in message
    assert "its schema is not the primary's" in message and "small_sky_object_catalog" in message
    assert report.rows_expected == report.primary_rows_read == 0 and not report.ok
    code = cli.main(["verify", str(margins["exact_180"]), "--primary", str(other), "--scheduler",
                     client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith("structural:")] == [f"structural: {message}"]


def test_the_primary_named_in_the_margin_is_accepted_under_another_directory_name(margins, catalogs, tmp_path):
    """The link is the catalog's name: a copy of the primary in a directory of another name passes."""
    copy = tmp_path / "renamed_copy"
    shutil.copytree(catalogs / SOURCE, copy)
    report = verify_margin(margins["exact_10"], copy)
    _assert_clean(report)
    assert report.rows_expected > 0


# ------------------------------------------------------------------------ Dask, cost (issue 11)
def test_batches_on_dask_give_the_same_report_as_in_process(margins, client):
    alone = verify_margin(margins["coarse_180"])
    on_dask = verify_margin(margins["coarse_180"], client=client, max_rows_in_memory=50)
    assert on_dask.per_pixel == alone.per_pixel and on_dask.per_pixel
    for name in ("rows_in_margin", "rows_expected", "primary_rows_read", "missing", "extra", "altered",
                 "duplicates", "extra_histogram", "structural", "max_extra_distance_ratio"):
        assert getattr(on_dask, name) == getattr(alone, name), name


def test_batches_are_cut_for_the_workers_and_the_memory_budget():
    from hats_margin.verify.checker import cut_batches

    rows = {0: 10, 5: 300, 9: 10}
    for threads, budget in ((1, 10**9), (4, 10**9), (1, 100)):
        batches = list(cut_batches(12, rows, budget, threads))
        assert np.concatenate(batches).tolist() == list(range(12))
        assert len(batches) == {(1, 10**9): 1, (4, 10**9): 6, (1, 100): 3}[(threads, budget)]


def test_verify_does_not_compile_hats_negative_tree(margins, monkeypatch):
    """hats' numba negative tree costs 6-15 s per process; the verifier computes its own."""
    def refuse(*args, **kwargs):
        raise AssertionError("hats' negative tree was called")

    monkeypatch.setattr(hats.catalog.Catalog, "generate_negative_tree_pixels", refuse)
    monkeypatch.setattr(hats.pixel_tree.negative_tree, "compute_negative_tree_pixels", refuse)
    _assert_clean(verify_margin(margins["exact_10"]))


def _random_disjoint_pixels(rng, n=150, max_order=8):
    pixels, ranges = [], []
    for _ in range(n):
        order = int(rng.integers(0, max_order + 1))
        pixel = int(rng.integers(0, 12 * 4**order))
        lo, hi = pixel << (2 * (29 - order)), (pixel + 1) << (2 * (29 - order))
        if all(hi <= a or lo >= b for a, b in ranges):
            ranges.append((lo, hi))
            pixels.append((order, pixel))
    return pixels


def test_the_verifiers_negative_tree_is_the_maximal_complement():
    from hats_margin.verify.tiles import Tiles, negative_tree

    rng = np.random.default_rng(7)
    for _ in range(30):
        pixels = _random_disjoint_pixels(rng)
        negative = negative_tree(pixels)
        assert Tiles(pixels + negative).check_cover() is None  # disjoint, and the whole sky
        taken = {(o, p) for o, p in pixels}
        for order, pixel in negative:  # maximal: the parent would overlap a partition
            assert order == 0 or any(
                (o >= order - 1 and p >> (2 * (o - order + 1)) == pixel >> 2) for o, p in taken
            ), (order, pixel)
    assert negative_tree([]) == [(0, p) for p in range(12)]
    assert negative_tree([(0, p) for p in range(12)]) == []


@pytest.mark.slow
def test_the_verifiers_negative_tree_equals_hats():
    from hats.pixel_math import HealpixPixel
    from hats.pixel_tree.negative_tree import compute_negative_tree_pixels
    from hats.pixel_tree.pixel_tree import PixelTree

    from hats_margin.verify.tiles import negative_tree

    rng = np.random.default_rng(11)
    for _ in range(20):
        pixels = _random_disjoint_pixels(rng)
        tree = PixelTree.from_healpix([HealpixPixel(o, p) for o, p in pixels])
        expected = sorted((p.order, p.pixel) for p in compute_negative_tree_pixels(tree))
        assert sorted(negative_tree(pixels)) == expected

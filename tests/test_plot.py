"""The margin sky map (create_plot=True / --plot)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from upath import UPath

from hats_margin import MarginCacheArguments, cli, pipeline_with_client, plot
from hats_margin.plot import FILE_NAME, _view, bin_rows, density_order, render_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_create_plot_writes_the_sky_map_beside_the_catalog(client, catalogs, tmp_path):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / "small_sky_source_catalog", output_path=tmp_path,
        output_artifact_name="with_plot", margin_threshold=10, progress_bar=False, create_plot=True,
    )
    pipeline_with_client(args, client)
    data = (tmp_path / "with_plot" / FILE_NAME).read_bytes()
    width, height = png_size(data)
    assert 600 < width < 2000 and 400 < height < 1500
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(data))
    assert pixels[..., :3].std() > 0.05, "the map is not blank"
    assert _coloured_pixels(data) > 0, "the margin rows are drawn"


def test_cli_plot_flag(capsys, client, catalogs, tmp_path):
    code = cli.main(["build", str(catalogs / "small_sky_object_catalog"), str(tmp_path), "--threshold", "3600",
                     "--plot", "--scheduler", client.scheduler.address, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    png_size((tmp_path / "small_sky_object_catalog_1deg" / FILE_NAME).read_bytes())


def test_no_plot_by_default(client, catalogs, tmp_path):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / "small_sky_object_catalog", output_path=tmp_path,
        output_artifact_name="no_plot", margin_threshold=3600, progress_bar=False,
    )
    pipeline_with_client(args, client)
    assert not (tmp_path / "no_plot" / FILE_NAME).exists()


def test_empty_margin_still_plots_the_partitions():
    png_size(render_png([(0, 11)], {(0, 11): 0}, "empty margin"))


def test_plot_to_a_remote_path():
    from types import SimpleNamespace

    from hats_margin.plot import plot_margin

    plan = SimpleNamespace(
        catalog=SimpleNamespace(partitions=[(1, 44), (1, 45)], healpix_order=29),
        args=SimpleNamespace(output_artifact_name="remote"),
        threshold_arcsec=5.0,
    )
    target = UPath("memory://plots/remote/margin_sky_map.png")
    index = np.array([44 << 56, 46 << 56], dtype=np.uint64).repeat([3, 12])
    plot_margin(plan, {(1, 44): 3, (1, 46): 12}, target, margin_index=index)
    png_size(target.read_bytes())


@pytest.mark.parametrize(
    ("pixels", "zoomed"),
    [
        ([(3, p) for p in range(704, 720)], True),  # a patch of ~10 degrees
        ([(0, p) for p in range(12)], False),  # the whole sky
        ([(0, 0), (0, 10)], False),  # far apart
    ],
)
def test_view_zooms_only_on_small_footprints(pixels, zoomed):
    view = _view(pixels)
    assert bool(view) is zoomed
    if zoomed:
        assert view["projection"] == "TAN"


def _coloured_pixels(data: bytes) -> int:
    """Pixels that are neither grey nor white (the density cells; partitions are grey)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(io.BytesIO(data))[..., :3]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum())


def test_margin_rows_are_drawn_at_a_fine_order_where_they_are():
    """Margin rows colour fine cells; a margin without rows colours none (only grey partitions)."""
    partitions = [(1, 44), (1, 45), (1, 46), (1, 47)]
    # spatial indices (order 29) of rows in eight order-6 cells of pixel 44
    edge_cells = np.array([(44 << 10) + c for c in range(1 << 10)], dtype=np.uint64)
    edge_cells = edge_cells[(edge_cells & np.uint64(0b0101010101)) == np.uint64(0b0101010101)][:8]
    index = np.repeat(edge_cells << np.uint64(2 * (29 - 6)), 5)
    with_rows = render_png(partitions, {(1, 45): len(index)}, "edge", margin_index=index)
    without = render_png(partitions, {(1, 45): 0}, "none", margin_index=np.zeros(0, dtype=np.uint64))
    assert _coloured_pixels(with_rows) > 0
    assert _coloured_pixels(without) == 0


def test_density_order_follows_the_view_within_bounds():
    assert density_order(3.0, 1, 29) == 5  # whole sky: ~3 degree cells
    assert density_order(0.1, 1, 29) == 10
    assert density_order(0.1, 1, 8) == 8  # not finer than the spatial index allows
    assert density_order(60.0, 4, 29) == 4  # finer than the partitions


def test_bin_rows_counts_every_row_and_coarsens_when_too_many_cells(monkeypatch):
    index = (np.arange(1000, dtype=np.uint64) * np.uint64(7919)) << np.uint64(2 * (29 - 12))
    order, cells, counts = bin_rows(index, 29, 12)
    assert order == 12 and counts.sum() == 1000
    monkeypatch.setattr(plot, "_MAX_CELLS", 50)
    order, cells, counts = bin_rows(index, 29, 12)
    assert order < 12 and len(cells) <= 50 and counts.sum() == 1000
    assert np.array_equal(cells, np.unique(index >> np.uint64(2 * (29 - order))))

"""The margin sky map (create_plot=True / --plot)."""

from __future__ import annotations

import io

import pytest
from upath import UPath

from hats_margin import MarginCacheArguments, cli, pipeline_with_client
from hats_margin.plot import FILE_NAME, _view, render_png

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
        catalog=SimpleNamespace(partitions=[(1, 44), (1, 45)]),
        args=SimpleNamespace(output_artifact_name="remote"),
        threshold_arcsec=5.0,
    )
    target = UPath("memory://plots/remote/margin_sky_map.png")
    plot_margin(plan, {(1, 44): 3, (1, 46): 12}, target)
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

"""The margin sky map: where the margin rows are, at a fine order, over the primary's partition outlines.

The margin of a partition is a thin band along its edges, fed by its neighbours. Colouring whole
margin pixels by their row count hides that band, so the map bins the margin rows themselves
(their spatial index) at a fine HEALPix order chosen from the field of view, colours those cells
by row count on a log scale, and draws the primary's partitions below (light fill) and their
outlines above. Drawn with hats' ``plot_healpix_map`` (astropy WCS axes); the view zooms on the
primary's footprint unless it spans most of the sky. The PNG is rendered into memory and written
with one ``write_bytes``, so the destination may be any UPath (local or object storage).
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from upath import UPath

logger = logging.getLogger(__name__)

FILE_NAME = "margin_sky_map.png"
_FULL_SKY_FOV_DEG = 140.0
_MAX_CELLS = 60_000  # polygons drawn at most: coarser density cells beyond this
_PARTITION_FILL, _PARTITION_EDGE = "0.92", "0.3"


def plot_margin(plan, pixel_rows: dict[tuple[int, int], int], path: UPath, margin_index: np.ndarray | None = None):
    """Write the sky map PNG of a finished margin to ``path``.

    ``pixel_rows`` maps each margin pixel ``(order, pixel)`` to its row count (zeros allowed); the
    margin rows' spatial index is read from the margin's files (one column) unless given.
    """
    rows, pixels = sum(pixel_rows.values()), sum(1 for n in pixel_rows.values() if n > 0)
    title = (
        f"{plan.args.output_artifact_name}: {rows:,} margin row{'s' * (rows != 1)} in {pixels} "
        f"pixel{'s' * (pixels != 1)}, threshold {plan.threshold_arcsec:g} arcsec"
    )
    index = margin_index if margin_index is not None else read_margin_index(plan, [p for p, n in pixel_rows.items() if n])
    png = render_png(
        partitions=list(plan.catalog.partitions), pixel_rows=pixel_rows, title=title,
        margin_index=index, index_order=plan.catalog.healpix_order,
    )
    path.write_bytes(png)
    logger.info("wrote the margin sky map %s", path)


def read_margin_index(plan, pixels: list[tuple[int, int]]) -> np.ndarray:
    """The spatial index of every margin row (the written margin files, one column)."""
    from hats_margin.io import open_parquet, output_file

    args, column = plan.args, plan.catalog.healpix_column
    parts = [
        open_parquet(output_file(args.catalog_path, o, p, args.npix_suffix, args.npix_parquet_name))
        .read(columns=[column]).column(0).to_numpy()
        for o, p in pixels
    ]
    return np.concatenate(parts).astype(np.uint64) if parts else np.zeros(0, dtype=np.uint64)


def density_order(cell_deg: float, lowest: int, highest: int) -> int:
    """The coarsest order whose cells are at most ``cell_deg`` wide, within ``lowest..highest``."""
    order0_deg = math.degrees(math.sqrt(4 * math.pi / 12))  # ~58.6 deg
    order = math.ceil(math.log2(order0_deg / cell_deg))
    return int(min(max(order, lowest), highest))


def bin_rows(index: np.ndarray, index_order: int, order: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Row counts per order-``order`` cell of the rows with spatial index ``index`` (at
    ``index_order``); one order coarser at a time while more than _MAX_CELLS cells are filled."""
    order = min(order, index_order)
    cells, counts = np.unique(index >> np.uint64(2 * (index_order - order)), return_counts=True)
    while len(cells) > _MAX_CELLS and order > 0:
        order -= 1
        cells, inverse = np.unique(cells >> np.uint64(2), return_inverse=True)
        counts = np.bincount(inverse, weights=counts).astype(np.int64)
    return order, cells, counts


def render_png(
    partitions: list[tuple[int, int]],
    pixel_rows: dict[tuple[int, int], int],
    title: str,
    margin_index: np.ndarray | None = None,
    index_order: int = 29,
) -> bytes:
    """The sky map as PNG bytes (no I/O). Without ``margin_index`` the margin pixels are
    coloured by their row counts instead of the rows' density."""
    from hats.inspection.visualize_catalog import plot_healpix_map
    from matplotlib import pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    footprint = sorted(set(partitions) | {pix for pix, n in pixel_rows.items() if n > 0})
    view = _view(footprint)
    # density cells of ~3 screen pixels: the whole sky is ~700 px wide, a zoomed view ~500 px high
    cell_deg = view["fov"][1].to_value("deg") / 170 if view else 360.0 / 120
    highest = max((o for o, _ in footprint), default=0)
    fig = plt.figure(figsize=(10, 6))
    try:
        p_orders, p_pixels = _split(partitions)
        fig, ax = plot_healpix_map(
            np.zeros(len(p_pixels)), ipix=p_pixels, depth=p_orders, fig=fig, cbar=False,
            cmap="Greys", norm=None, facecolor=_PARTITION_FILL, edgecolor="none", title=title, **view,
        )
        ax.collections[-1].set_array(None)  # a plain fill: the partitions carry no value
        if margin_index is not None:
            order = density_order(cell_deg, highest + 1, index_order)
            order, cells, counts = bin_rows(np.asarray(margin_index, dtype=np.uint64), index_order, order)
            label = f"margin rows per order-{order} cell"
            depth = np.full(len(cells), order)
        else:
            filled = [(pix, n) for pix, n in sorted(pixel_rows.items()) if n > 0]
            depth, cells = _split([pix for pix, _ in filled])
            counts = np.array([n for _, n in filled], dtype=np.int64)
            label = "margin rows in pixel"
        if len(cells):
            counts = counts.astype(float)
            low, high = counts.min(), max(counts.max(), counts.min() + 1)
            norm = LogNorm(vmin=low, vmax=high) if high / low >= 10 else Normalize(vmin=low, vmax=high)
            plot_healpix_map(
                counts, ipix=cells, depth=depth, ax=ax, wcs=ax.wcs, cbar=False, title=title,
                cmap="viridis", norm=norm, edgecolor="face", linewidth=0.8,  # tiny cells stay visible
            )
            colorbar = fig.colorbar(ax.collections[-1], ax=ax, shrink=0.8, pad=0.08 if view else 0.04)
            colorbar.set_label(label)
            if isinstance(norm, LogNorm):
                colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        # the partition outlines above the density, so each band sits visibly on its edge
        plot_healpix_map(
            np.zeros(len(p_pixels)), ipix=p_pixels, depth=p_orders, ax=ax, wcs=ax.wcs, cbar=False, title=title,
            cmap="Greys", norm=None, facecolor="none", edgecolor=_PARTITION_EDGE, linewidth=0.6,
        )
        outlines = ax.collections[-1]
        outlines.set_array(None)
        outlines.set_facecolor("none")
        if view:  # zoomed (gnomonic): RA labels on top, Dec labels left and bottom, title above them
            ax.coords[0].set_ticklabel_position("t")
            ax.coords[0].set_axislabel_position("t")
            ax.coords[0].set_axislabel("RA", minpad=1.6)  # clear of the tick labels
            ax.coords[1].set_ticklabel_position("lb")
            ax.coords[1].set_axislabel_position("l")
            ax.coords[1].set_axislabel("Dec", minpad=1.2)
            ax.set_title(title, pad=42)
        else:  # whole sky: the RA tick labels run along the equator; its name goes below the frame
            ax.coords[0].set_axislabel("")
            ax.text(0.5, -0.03, "RA", transform=ax.transAxes, ha="center", va="top")
        handles = [Patch(facecolor=_PARTITION_FILL, edgecolor=_PARTITION_EDGE, label="primary partition")]
        if not len(cells):
            handles.append(Patch(facecolor="none", edgecolor="none", label="(no margin rows)"))
        ax.legend(handles=handles, loc="lower left", fontsize="small", framealpha=0.9)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _split(pixels: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Orders and pixels of (order, pixel) pairs as two int64 arrays."""
    array = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _view(partitions: list[tuple[int, int]]) -> dict:
    """``center``/``fov`` of a gnomonic view framing the pixels, or {} (the whole sky, Mollweide)
    for a wide footprint."""
    if not partitions:
        return {}
    import astropy.units as u
    import cdshealpix
    from astropy.coordinates import SkyCoord

    vectors = []
    for order in sorted({o for o, _ in partitions}):
        pixels = np.array([p for o, p in partitions if o == order], dtype=np.uint64)
        lon, lat = cdshealpix.nested.vertices(pixels, order)
        ra, dec = np.radians(lon.to_value(u.deg)).ravel(), np.radians(lat.to_value(u.deg)).ravel()
        vectors.append(np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1))
    points = np.concatenate(vectors)
    mean = points.mean(axis=0)
    if np.linalg.norm(mean) < 0.2:
        return {}
    center = mean / np.linalg.norm(mean)
    radius_deg = float(np.degrees(np.arccos(np.clip(points @ center, -1, 1))).max())
    # the gnomonic projection puts a point at angle r from the center at tan(r) on the plane
    fov_deg = 2.2 * float(np.degrees(np.tan(np.radians(min(radius_deg, 80.0))))) + 1.0
    if fov_deg > _FULL_SKY_FOV_DEG:
        return {}
    ra_deg = float(np.degrees(np.arctan2(center[1], center[0])) % 360)
    dec_deg = float(np.degrees(np.arcsin(np.clip(center[2], -1, 1))))
    return {
        "center": SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs"),
        "fov": (1.5 * fov_deg * u.deg, fov_deg * u.deg),  # the figure is wider than high
        "projection": "TAN",
    }

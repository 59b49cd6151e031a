"""The margin sky map: margin pixels coloured by row count, over the primary's partitions.

Drawn with hats' HEALPix plotting helper (``hats.inspection.visualize_catalog.plot_healpix_map``,
astropy WCS axes). The view zooms on the primary's footprint unless it spans most of the sky.
The PNG is rendered into memory and written with one ``write_bytes``, so the destination may be
any UPath (local or object storage).
"""

from __future__ import annotations

import io
import logging

import cdshealpix
import numpy as np
from upath import UPath

logger = logging.getLogger(__name__)

FILE_NAME = "margin_sky_map.png"
_FULL_SKY_FOV_DEG = 140.0


def plot_margin(plan, pixel_rows: dict[tuple[int, int], int], path: UPath):
    """Write the sky map PNG of a finished margin to ``path``.

    ``pixel_rows`` maps each margin pixel ``(order, pixel)`` to its row count (zeros allowed).
    """
    rows, pixels = sum(pixel_rows.values()), sum(1 for n in pixel_rows.values() if n > 0)
    title = (
        f"{plan.args.output_artifact_name}: {rows} margin row{'s' * (rows != 1)} in {pixels} "
        f"pixel{'s' * (pixels != 1)}, threshold {plan.threshold_arcsec:g} arcsec"
    )
    png = render_png(partitions=list(plan.catalog.partitions), pixel_rows=pixel_rows, title=title)
    path.write_bytes(png)
    logger.info("wrote the margin sky map %s", path)


def render_png(partitions: list[tuple[int, int]], pixel_rows: dict[tuple[int, int], int], title: str) -> bytes:
    """The sky map as PNG bytes."""
    from hats.inspection.visualize_catalog import plot_healpix_map
    from matplotlib import pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    view = _view(sorted(set(partitions) | {pix for pix, n in pixel_rows.items() if n > 0}))
    fig = plt.figure(figsize=(10, 6))
    try:
        p_orders, p_pixels = _split(partitions)
        fig, ax = plot_healpix_map(
            np.zeros(len(p_pixels)), ipix=p_pixels, depth=p_orders, fig=fig, cbar=False,
            cmap="Greys", norm=None, facecolor="0.88", edgecolor="0.55", linewidth=0.6, title=title, **view,
        )
        ax.collections[-1].set_array(None)  # a plain fill: the partitions carry no value
        filled = [(pix, n) for pix, n in sorted(pixel_rows.items()) if n > 0]
        if filled:
            m_orders, m_pixels = _split([pix for pix, _ in filled])
            counts = np.array([n for _, n in filled], dtype=float)
            low, high = counts.min(), max(counts.max(), counts.min() + 1)
            norm = LogNorm(vmin=low, vmax=high) if high / low >= 50 else Normalize(vmin=low, vmax=high)
            plot_healpix_map(
                counts, ipix=m_pixels, depth=m_orders, ax=ax, wcs=ax.wcs, cbar=False, title=title,
                cmap="viridis", norm=norm, edgecolor="0.2", linewidth=0.6,
            )
            colorbar = fig.colorbar(ax.collections[-1], ax=ax, shrink=0.8, pad=0.04)
            colorbar.set_label("margin rows in pixel")
            if isinstance(norm, LogNorm):
                colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if view:  # zoomed (gnomonic): RA labels on top, Dec labels left and bottom, title above them
            ax.coords[0].set_ticklabel_position("t")
            ax.coords[0].set_axislabel_position("t")
            ax.coords[0].set_axislabel("RA")
            ax.coords[1].set_ticklabel_position("lb")
            ax.coords[1].set_axislabel_position("l")
            ax.coords[1].set_axislabel("Dec")
            ax.set_title(title, pad=30)
        ax.legend(
            handles=[Patch(facecolor="0.88", edgecolor="0.55", label="primary partition (no margin rows)")],
            loc="lower left", fontsize="small", framealpha=0.9,
        )
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _split(pixels: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _view(partitions: list[tuple[int, int]]) -> dict:
    """``center``/``fov`` of a gnomonic view framing the pixels, or {} (the whole sky, Mollweide)
    for a wide footprint."""
    if not partitions:
        return {}
    import astropy.units as u
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

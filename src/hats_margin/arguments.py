"""MarginCacheArguments: what the user asks for, validated value by value.

Validation never touches the disk: no directory is created, listed or deleted while the
arguments are built. Everything that needs the disk (does the input exist, is it a HATS
catalog, is tmp_dir writable) is checked at the start of planning, before any work.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from upath import UPath

from hats_margin.errors import ArgumentError
from hats_margin.geometry import MAX_ORDER, coarse_order_for_threshold, coarse_reach_arcsec, ring_reach_arcsec

DEFAULT_THRESHOLD_ARCSEC = 5.0
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_PATHLIKE = (str, Path, UPath)


@dataclass
class MarginCacheArguments:
    """Arguments of a margin cache build. All keyword; see each field's comment."""

    input_catalog_path: str | Path | UPath | None = None
    """HATS catalog (object or source) to build the margin for; a HATS collection's primary is used."""
    output_path: str | Path | UPath | None = None
    """Directory that will hold the margin catalog directory."""
    output_artifact_name: str = ""
    """Name of the margin catalog; the margin is written to ``output_path/output_artifact_name``."""
    margin_threshold: float | None = None
    """Margin width in arcseconds (default 5.0). A row joins the margin of a pixel when its
    great-circle distance to the pixel is at most this."""
    margin_order: int | None = None
    """HEALPix order used to find candidate rows (default: derived from the threshold). It only
    changes speed in exact mode; in coarse mode it defines the row set, as in hats-import."""
    fine_filtering: bool = True
    """True: exactly the rows within ``margin_threshold``. False: hats-import's coarse set (every
    row whose ``margin_order`` pixel touches the destination pixel)."""
    overwrite: bool = False
    """Replace an existing valid catalog at the output. Only the artifact directory is touched."""
    resume: bool = True
    """Continue a killed run from its intermediate files (refused if any value changed).
    False discards this run's own intermediate files and starts over."""
    tmp_dir: str | Path | UPath | None = None
    """Where intermediate files go (``tmp_dir/<name>/intermediate``); default: dask_tmp, else the
    artifact directory."""
    dask_tmp: str | Path | UPath | None = None
    """Dask workers' local directory (pipeline() only), and fallback for tmp_dir."""
    dask_n_workers: int = 1
    """Worker processes of the local cluster that pipeline() creates."""
    dask_threads_per_worker: int = 1
    """Threads per worker of the local cluster that pipeline() creates."""
    progress_bar: bool = True
    """Show a tqdm progress bar per stage."""
    completion_email_address: str = ""
    """Send a success or failure email here when the run ends (SMTP, see notify)."""
    smtp_host: str | None = None
    """SMTP server host (default: $HATS_MARGIN_SMTP_HOST or localhost)."""
    smtp_port: int | None = None
    """SMTP server port (default: $HATS_MARGIN_SMTP_PORT or 25)."""
    addl_hats_properties: dict | None = None
    """Extra key/values for hats.properties (cannot override the keys that describe the margin)."""
    npix_suffix: str = ".parquet"
    """Suffix of the output leaves; ``"/"`` makes one directory per pixel."""
    npix_parquet_name: str | None = None
    """File name inside ``Npix=N/`` when ``npix_suffix="/"`` (default ``Npix=N.parquet``)."""
    write_table_kwargs: dict | None = None
    """Overrides of the parquet writer options (default: hats' settings with zstd level 3)."""
    create_metadata: bool = True
    """Write ``dataset/_metadata``."""
    create_plot: bool = False
    """Write ``margin_sky_map.png`` beside the catalog (needs matplotlib)."""

    # derived, not arguments
    threshold_given: bool = field(init=False, repr=False, default=False)
    order_given: bool = field(init=False, repr=False, default=False)

    def __post_init__(self):
        self._check_paths()
        self._check_threshold_and_order()
        self._check_runtime()
        self._check_output_options()

    # ------------------------------------------------------------------ checks
    def _check_paths(self):
        for name in ("input_catalog_path", "output_path"):
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ArgumentError(f"{name} is required (a directory path, str, Path or UPath)")
            if not isinstance(value, _PATHLIKE):
                raise ArgumentError(f"{name} must be a str, Path or UPath, not {type(value).__name__}")
        for name in ("tmp_dir", "dask_tmp"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, _PATHLIKE):
                raise ArgumentError(f"{name} must be a str, Path, UPath or None, not {type(value).__name__}")
        name = self.output_artifact_name
        if not isinstance(name, str) or not name:
            raise ArgumentError("output_artifact_name is required (e.g. 'my_catalog_10arcs')")
        if not _NAME_PATTERN.match(name) or name in (".", ".."):
            raise ArgumentError(
                f"output_artifact_name {name!r} contains invalid characters: use letters, digits, "
                "'.', '_' and '-' only (no path separators or spaces), starting with a letter or digit"
            )

    def _check_threshold_and_order(self):
        self.threshold_given = self.margin_threshold is not None
        self.order_given = self.margin_order is not None and self.margin_order != -1
        if self.threshold_given:
            value = self.margin_threshold
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ArgumentError(
                    f"margin_threshold must be a number of arcseconds, not {type(value).__name__} {value!r}"
                )
            value = float(value)
            if not math.isfinite(value) or value <= 0:
                raise ArgumentError(
                    f"margin_threshold must be a finite number of arcseconds > 0, got {value!r}"
                )
            self.margin_threshold = value
        if self.order_given:
            order = self.margin_order
            if isinstance(order, bool) or not isinstance(order, numbers.Integral):
                raise ArgumentError(f"margin_order must be an integer 0..{MAX_ORDER} (or None), not {order!r}")
            if not 0 <= int(order) <= MAX_ORDER:
                raise ArgumentError(f"margin_order must be between 0 and {MAX_ORDER}, got {order}")
            self.margin_order = int(order)
        if not self.threshold_given:
            if self.order_given and not self.fine_filtering:
                # hats-import semantics: a coarse margin at this order guarantees this width
                self.margin_threshold = coarse_reach_arcsec(self.margin_order)
            else:
                self.margin_threshold = DEFAULT_THRESHOLD_ARCSEC
        if not self.order_given:
            self.margin_order = coarse_order_for_threshold(self.margin_threshold)
        elif self.threshold_given:
            self._warn_on_conflict()

    def _warn_on_conflict(self):
        threshold, order = self.margin_threshold, self.margin_order
        if not self.fine_filtering and coarse_reach_arcsec(order) < threshold:
            warnings.warn(
                f"margin_order={order} cells are narrower ({coarse_reach_arcsec(order):.4g} arcsec) than "
                f"margin_threshold={threshold} arcsec: a coarse margin at this order can miss rows "
                f"closer than the threshold. Use margin_order <= {coarse_order_for_threshold(threshold)} "
                "or fine_filtering=True.",
                UserWarning,
                stacklevel=3,
            )
        elif self.fine_filtering and ring_reach_arcsec(order) * 4 < threshold:
            warnings.warn(
                f"margin_order={order} is much finer than margin_threshold={threshold} arcsec needs; "
                "the margin stays exact but the candidate search is slower. "
                f"margin_order={coarse_order_for_threshold(threshold)} would be faster.",
                UserWarning,
                stacklevel=3,
            )

    def _check_runtime(self):
        for name in ("dask_n_workers", "dask_threads_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
        for name in ("fine_filtering", "overwrite", "resume", "progress_bar", "create_metadata", "create_plot"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ArgumentError(f"{name} must be True or False, got {value!r}")
        address = self.completion_email_address
        if not isinstance(address, str) or (address and "@" not in address):
            raise ArgumentError(
                f"completion_email_address must be an email address like 'me@example.org' or '', got {address!r}"
            )
        if self.smtp_port is not None and (
            isinstance(self.smtp_port, bool) or not isinstance(self.smtp_port, int) or not 0 < self.smtp_port < 65536
        ):
            raise ArgumentError(f"smtp_port must be an integer 1..65535, got {self.smtp_port!r}")

    def _check_output_options(self):
        suffix = self.npix_suffix
        if not isinstance(suffix, str) or not (suffix == "/" or (suffix.startswith(".") and len(suffix) > 1)):
            raise ArgumentError(
                f"npix_suffix must be '/' (one directory per pixel) or a file extension like '.parquet', "
                f"got {suffix!r}"
            )
        if suffix != "/" and any(sep in suffix for sep in "/\\"):
            raise ArgumentError(f"npix_suffix {suffix!r} must not contain a path separator")
        pq_name = self.npix_parquet_name
        if pq_name is not None:
            if not isinstance(pq_name, str) or not _NAME_PATTERN.match(pq_name):
                raise ArgumentError(
                    f"npix_parquet_name must be a plain file name like 'part0.parquet', got {pq_name!r}"
                )
            if suffix != "/":
                raise ArgumentError("npix_parquet_name is only used with npix_suffix='/'")
        for name in ("addl_hats_properties", "write_table_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ArgumentError(f"{name} must be a dict or None, not {type(value).__name__}")

    # ------------------------------------------------------------------ derived
    @property
    def catalog_path(self) -> UPath:
        """``output_path / output_artifact_name``."""
        return UPath(self.output_path) / self.output_artifact_name

    @property
    def tmp_base(self) -> UPath:
        """Directory that holds this run's intermediate files."""
        if self.tmp_dir is not None:
            return UPath(self.tmp_dir) / self.output_artifact_name / "intermediate"
        if self.dask_tmp is not None:
            return UPath(self.dask_tmp) / self.output_artifact_name / "intermediate"
        return self.catalog_path / "intermediate"

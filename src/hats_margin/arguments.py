"""MarginCacheArguments: what the user asks for, validated value by value.

Validation never touches the disk: no directory is created, listed or deleted while the
arguments are built. Everything that needs the disk (does the input exist, is it a HATS
catalog, is tmp_dir writable) is checked at the start of planning, before any work.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from upath import UPath

from hats_margin.errors import ArgumentError
from hats_margin.geometry import MAX_ORDER, coarse_order_for_threshold, coarse_reach_arcsec, ring_reach_arcsec
from hats_margin.units import extreme_threshold_message, short_angle, threshold_arcsec

DEFAULT_THRESHOLD_ARCSEC = 5.0
MAX_NAME_BYTES = 255
"""Longest file name (bytes) that common file systems and object-store keys' path parts allow."""
MAX_MARGINS_PER_READ = 64
"""Most thresholds one read builds: the shard marks each row's margins in one 64-bit integer."""
# matched with fullmatch (``$`` would accept a trailing newline)
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
_SUFFIX_PATTERN = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._\-]*")
_PATHLIKE = (str, Path, UPath)
# one address: a local part without spaces, quotes or '@', and a host name (labels of letters,
# digits and '-'); checked with fullmatch, so nothing (not even a newline) may follow
_EMAIL_PATTERN = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


@dataclass
class MarginCacheArguments:
    """Arguments of a margin cache build. All keyword; see each field's comment."""

    input_catalog_path: str | Path | UPath | None = None
    """HATS catalog (object or source) to build the margin for; a HATS collection's primary is used."""
    output_path: str | Path | UPath | None = None
    """Directory that will hold the margin catalog directory."""
    output_artifact_name: str | list[str] = ""
    """Name of the margin catalog; the margin is written to ``output_path/output_artifact_name``.
    With several thresholds: one name per threshold (a list, same order), or one base name to
    which each threshold's short angle is appended (``gaia`` -> ``gaia_5arcs``, ``gaia_1arcmin``)."""
    margin_threshold: float | str | list | None = None
    """Margin width (default 5.0 arcsec): a number of arcseconds, a string with a unit
    (``"10arcsec"``, ``'10"'``, ``"1.5arcmin"``, ``"1deg"``, ``"500mas"``) or an astropy Quantity;
    stored as arcseconds. A row joins the margin of a pixel when its great-circle distance to the
    pixel is at most this. A list or tuple of widths builds one margin per width from one read of
    the catalog (exact mode only); each is the catalog a build with that width alone writes."""
    allow_extreme_threshold: bool = False
    """Confirm a threshold below 0.01 arcsec or above 10 degrees (refused otherwise: such values
    are usually a unit mistake, e.g. degrees given as arcseconds)."""
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
    check_input: bool = False
    """Check every row's ra/dec against its spatial index (reads ra/dec of every row). Without
    it, the rows the margin search reads anyway (the candidates) are checked."""

    # derived, not arguments
    threshold_given: bool = field(init=False, repr=False, default=False)
    order_given: bool = field(init=False, repr=False, default=False)
    margins: tuple[MarginCacheArguments, ...] = field(init=False, repr=False, default=())
    """With several thresholds: one single-threshold argument set per margin, in the given order
    (empty for a single margin)."""

    def __post_init__(self):
        """Check every argument and derive threshold and order; raises :class:`ArgumentError` naming the bad value."""
        if isinstance(self.margin_threshold, (list, tuple)) and self._split_thresholds():
            return
        self._check_paths()
        self._check_threshold_and_order()
        self._check_runtime()
        self._check_output_options()

    # ------------------------------------------------------------------ several thresholds
    def _split_thresholds(self) -> bool:
        """A list of thresholds: validate it and make ``margins`` (True), or, for a list of one,
        become that single build (False: the usual checks follow)."""
        values, names = list(self.margin_threshold), self.output_artifact_name
        if not values:
            raise ArgumentError("margin_threshold is an empty list: give one or more widths, e.g. [5, 10, 60]")
        if len(values) == 1:
            self.margin_threshold = values[0]
            if isinstance(names, (list, tuple)):
                if len(names) != 1:
                    raise ArgumentError(f"output_artifact_name has {len(names)} names for 1 margin_threshold")
                self.output_artifact_name = names[0]
            return False
        if self.fine_filtering is False:
            raise ArgumentError(
                "several margin_threshold values need exact margins: fine_filtering=False (coarse) builds one "
                "threshold per run; build each coarse margin on its own, or use fine_filtering=True"
            )
        arcsec = [threshold_arcsec(v) for v in values]
        repeated = sorted({a for a in arcsec if arcsec.count(a) > 1})
        if repeated:
            raise ArgumentError(
                f"margin_threshold lists {', '.join(f'{a:g}' for a in repeated)} arcsec more than once: "
                "give each width once"
            )
        if len(arcsec) > MAX_MARGINS_PER_READ:
            raise ArgumentError(
                f"margin_threshold lists {len(arcsec)} widths: one read builds at most {MAX_MARGINS_PER_READ} "
                "margins; split them into runs of at most that many"
            )
        if isinstance(names, (list, tuple)):
            if len(names) != len(arcsec):
                raise ArgumentError(
                    f"output_artifact_name has {len(names)} names for {len(arcsec)} margin_threshold values: "
                    "give one name per threshold, or one base name (each threshold's angle is appended)"
                )
            names = list(names)
        elif isinstance(names, str) and names:
            names = [f"{names}_{short_angle(a)}" for a in arcsec]
        else:
            raise ArgumentError(
                "output_artifact_name is required: one name per threshold (a list), or one base name "
                "(e.g. 'gaia' -> 'gaia_5arcs', 'gaia_10arcs')"
            )
        if len(set(names)) != len(names):
            raise ArgumentError(f"output_artifact_name gives the same name to two margins: {names}")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        self.margins = tuple(
            MarginCacheArguments(**{**fields, "margin_threshold": a, "output_artifact_name": n})
            for a, n in zip(arcsec, names)
        )
        self.margin_threshold = tuple(arcsec)
        self.output_artifact_name = tuple(names)
        self.threshold_given = True
        self.order_given = self.margins[0].order_given
        return True

    # ------------------------------------------------------------------ checks
    def _check_paths(self):
        """Input and output paths given and path-like; the artifact name a plain directory name."""
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
        if not _NAME_PATTERN.fullmatch(name):
            raise ArgumentError(
                f"output_artifact_name {name!r} contains invalid characters: use letters, digits, "
                "'.', '_' and '-' only (no path separators or spaces), starting with a letter or digit"
            )

    def _check_threshold_and_order(self):
        """Threshold to arcsec and order to int, each defaulted from the other when not given.

        No order: the finest order whose cells are at least as wide as the threshold. No threshold:
        ``DEFAULT_THRESHOLD_ARCSEC``, or in coarse mode with an order, the width its cells guarantee.
        """
        self.threshold_given = self.margin_threshold is not None
        self.order_given = self.margin_order is not None and self.margin_order != -1
        if self.threshold_given:
            self.margin_threshold = threshold_arcsec(self.margin_threshold)
            if not isinstance(self.allow_extreme_threshold, bool):
                raise ArgumentError(f"allow_extreme_threshold must be True or False, got {self.allow_extreme_threshold!r}")
            problem = extreme_threshold_message(self.margin_threshold, "allow_extreme_threshold=True")
            if problem and not self.allow_extreme_threshold:
                raise ArgumentError(problem)
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
            self._check_order_against_threshold()

    def _check_order_against_threshold(self):
        """Both given: coarse mode refuses cells narrower than the threshold; exact mode warns when
        the order is much finer than needed (slower, still exact).
        """
        threshold, order = self.margin_threshold, self.margin_order
        if not self.fine_filtering and coarse_reach_arcsec(order) < threshold:
            # a coarse margin keeps whole margin_order cells: narrower cells than the threshold
            # would write a margin labelled with a width it does not hold
            raise ArgumentError(
                f"margin_order={order} cells are narrower ({coarse_reach_arcsec(order):.4g} arcsec) than "
                f"margin_threshold={threshold:g} arcsec: a coarse margin at this order would miss rows closer "
                f"than the threshold. Use margin_order <= {coarse_order_for_threshold(threshold)}; or "
                "fine_filtering=True, exact at any order; or give no margin_threshold to record the "
                f"{coarse_reach_arcsec(order):.4g} arcsec this order honours"
            )
        if self.fine_filtering and ring_reach_arcsec(order) * 4 < threshold:
            warnings.warn(
                f"margin_order={order} is much finer than margin_threshold={threshold} arcsec needs; "
                "the margin stays exact but the candidate search is slower. "
                f"margin_order={coarse_order_for_threshold(threshold)} would be faster.",
                UserWarning,
                stacklevel=3,
            )

    def _check_runtime(self):
        """Worker counts positive integers, flags booleans, email address and SMTP port well-formed."""
        for name in ("dask_n_workers", "dask_threads_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
        for name in ("fine_filtering", "overwrite", "resume", "progress_bar", "create_metadata", "create_plot",
                     "check_input"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ArgumentError(f"{name} must be True or False, got {value!r}")
        address = self.completion_email_address
        if not isinstance(address, str) or (address and not _EMAIL_PATTERN.fullmatch(address)):
            raise ArgumentError(
                "completion_email_address must be an email address: one address like 'me@example.org' (no "
                f"spaces, commas or line breaks), or '' for no email; got {address!r}"
            )
        if self.smtp_port is not None and (
            isinstance(self.smtp_port, bool) or not isinstance(self.smtp_port, int) or not 0 < self.smtp_port < 65536
        ):
            raise ArgumentError(f"smtp_port must be an integer 1..65535, got {self.smtp_port!r}")

    def _check_output_options(self):
        """``npix_suffix`` is '/' or an extension, ``npix_parquet_name`` a plain file name (only with
        '/'), the names fit a file name (255 bytes), and the property and write kwargs are dicts or None."""
        for name in ("output_artifact_name", "npix_parquet_name"):
            value = getattr(self, name)
            if isinstance(value, str) and len(value.encode()) > MAX_NAME_BYTES:
                raise ArgumentError(
                    f"{name} is {len(value.encode())} bytes long; file systems allow names of at most "
                    f"{MAX_NAME_BYTES} bytes: choose a shorter name ({value[:20]!r}...)"
                )
        suffix = self.npix_suffix
        if not isinstance(suffix, str) or not (suffix == "/" or _SUFFIX_PATTERN.fullmatch(suffix)):
            raise ArgumentError(
                f"npix_suffix must be '/' (one directory per pixel) or a file extension like '.parquet' "
                f"('.' then letters, digits, '.', '_' or '-'), got {suffix!r}"
            )
        pq_name = self.npix_parquet_name
        if pq_name is not None:
            if not isinstance(pq_name, str) or not _NAME_PATTERN.fullmatch(pq_name):
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
        """``output_path / output_artifact_name`` (several margins: each of ``margins`` has its own)."""
        if self.margins:
            raise AttributeError("several margins: use each of args.margins")
        return UPath(self.output_path) / self.output_artifact_name

    @property
    def tmp_base(self) -> UPath:
        """Directory that holds this run's intermediate files."""
        if self.margins:
            raise AttributeError("several margins: use each of args.margins")
        if self.tmp_dir is not None:
            return UPath(self.tmp_dir) / self.output_artifact_name / "intermediate"
        if self.dask_tmp is not None:
            return UPath(self.dask_tmp) / self.output_artifact_name / "intermediate"
        return self.catalog_path / "intermediate"

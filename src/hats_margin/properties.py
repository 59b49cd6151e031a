"""A catalog's ``hats.properties`` and ``partition_info.csv`` read and written without importing hats.

Importing hats costs about a second of CPU (it loads pandas, astropy, mocpy, nested-pandas), more
than the whole bundled demo build. The build's driver only needs a few keys and the partition
list, so it reads them here. Anything this small reader does not understand for certain (escaped
characters, missing or malformed keys, a catalog type other than object/source, a missing or
unusual ``partition_info.csv``) is handed to hats, which is then imported lazily and gives its
own answer or error, exactly as before. The margin's ``hats.properties`` is written here in the
bytes hats' ``TableProperties.to_properties_file_path`` writes (``key=value`` lines, values as
``str()``, unescaped, after a ``#HATS catalog`` comment).
"""

from __future__ import annotations

from dataclasses import dataclass

from upath import UPath

PROPERTIES_FILES = ("hats.properties", "properties")

# (our attribute, the key in hats.properties), in the order hats writes them
MARGIN_KEYS = (
    ("catalog_name", "obs_collection"),
    ("catalog_type", "dataproduct_type"),
    ("total_rows", "hats_nrows"),
    ("ra_column", "hats_col_ra"),
    ("dec_column", "hats_col_dec"),
    ("healpix_column", "hats_col_healpix"),
    ("healpix_order", "hats_col_healpix_order"),
    ("primary_catalog", "hats_primary_table_url"),
    ("margin_threshold", "hats_margin_threshold"),
    ("npix_suffix", "hats_npix_suffix"),
    ("hats_estsize", "hats_estsize"),
    ("moc_sky_fraction", "moc_sky_fraction"),
    ("hats_order", "hats_order"),
)


@dataclass(frozen=True)
class CatalogProperties:
    """The keys of a primary catalog's properties the margin build uses (names as in hats'
    ``TableProperties``)."""

    catalog_name: str
    catalog_type: str
    total_rows: int | None
    ra_column: str | None
    dec_column: str | None
    healpix_column: str | None = None
    healpix_order: int | None = None
    npix_suffix: str | None = None


def parse_properties(text: str) -> dict[str, str] | None:
    """``key=value`` lines of a properties file; None when it uses anything beyond that
    (backslash escapes, continuation lines, ``key: value`` or ``key value`` separators)."""
    values = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#!":
            continue
        if "\\" in line or "=" not in line:
            return None
        key, value = line.split("=", 1)
        if not key.strip() or any(c in key.strip() for c in " \t:"):
            return None
        values[key.strip()] = value.strip()
    return values


def _simple_properties(path: UPath) -> CatalogProperties | None:
    """The properties of an object or source catalog read without hats, or None to ask hats."""
    for name in PROPERTIES_FILES:
        try:
            text = (path / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            return None
        values = parse_properties(text)
        if values is None or values.get("dataproduct_type") not in ("object", "source"):
            return None
        try:
            total = int(values["hats_nrows"]) if "hats_nrows" in values else None
            order = int(values["hats_col_healpix_order"]) if "hats_col_healpix_order" in values else None
        except ValueError:
            return None
        if not values.get("obs_collection") or not values.get("hats_col_ra") or not values.get("hats_col_dec"):
            return None
        return CatalogProperties(
            catalog_name=values["obs_collection"],
            catalog_type=values["dataproduct_type"],
            total_rows=total,
            ra_column=values["hats_col_ra"],
            dec_column=values["hats_col_dec"],
            healpix_column=values.get("hats_col_healpix") or None,
            healpix_order=order,
            npix_suffix=values.get("hats_npix_suffix") or ".parquet",  # hats' default
        )
    return None


def read_catalog_properties(path: UPath) -> CatalogProperties:
    """The properties of the catalog at ``path``: read here for a plain object or source
    catalog, else by hats (imported only then), which raises ``FileNotFoundError`` (no
    properties file) or ``ValueError`` (invalid values) as it always did."""
    simple = _simple_properties(path)
    if simple is not None:
        return simple
    from hats.catalog import TableProperties

    props = TableProperties.read_from_dir(path)
    return CatalogProperties(
        catalog_name=props.catalog_name,
        catalog_type=str(props.catalog_type),
        total_rows=props.total_rows,
        ra_column=props.ra_column,
        dec_column=props.dec_column,
        healpix_column=props.healpix_column,
        healpix_order=props.healpix_order,
        npix_suffix=props.npix_suffix,
    )


def sort_breadth_first(pixels) -> list[tuple[int, int]]:
    """(order, pixel) pairs in hats' order (``sort_pixels``): by the pixel's first cell at the
    deepest order, ties kept in the given order."""
    pixels = [(int(o), int(p)) for o, p in pixels]
    deepest = max((o for o, _ in pixels), default=0)
    return sorted(pixels, key=lambda op: op[1] << (2 * (deepest - op[0])))


def read_partitions(path: UPath) -> list[tuple[int, int]] | None:
    """The partitions listed in ``partition_info.csv`` (``Norder,Npix`` header, one integer pair
    per line), sorted as hats sorts them; None when the file is missing or not that simple."""
    try:
        lines = (path / "partition_info.csv").read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or [c.strip() for c in lines[0].split(",")] != ["Norder", "Npix"]:
        return None
    try:
        pairs = [tuple(int(x) for x in line.split(",")) for line in lines[1:]]
    except ValueError:
        return None
    if any(len(pair) != 2 or pair[0] < 0 or pair[1] < 0 or pair[1] >= 12 * 4 ** pair[0] for pair in pairs):
        return None
    return sort_breadth_first(pairs)


def catalog_partitions(path: UPath, what: str = "") -> list[tuple[int, int]]:
    """The pixels a catalog lists: its ``partition_info.csv`` read here, else hats (imported
    only then: ``_metadata``, or hats' own error), whose failure becomes an
    :class:`InputCatalogError` naming ``what`` (e.g. ``"the primary "``) and ``path``."""
    pixels = read_partitions(path)
    if pixels is not None:
        return pixels
    import hats

    from hats_margin.errors import InputCatalogError, describe_invalid

    try:
        loaded = hats.read_hats(path, read_moc=False)
    except Exception as exc:  # hats raises many types for broken catalogs
        raise InputCatalogError(
            f"hats cannot open {what}{path}: {type(exc).__name__}: {describe_invalid(exc)}"
        ) from exc
    return [(p.order, p.pixel) for p in loaded.get_healpix_pixels()]


def properties_text(values: dict) -> str:
    """The bytes hats writes for a properties dict (keys as in hats.properties, in this order,
    None left out), as text."""
    lines = ["#HATS catalog"] + [f"{key}={value}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def write_partition_info(target: UPath, pixels) -> None:
    """``partition_info.csv``: ``Norder,Npix`` then one line per pixel, in the order given."""
    lines = ["Norder,Npix"] + [f"{o},{p}" for o, p in pixels]
    (target / "partition_info.csv").write_text("\n".join(lines) + "\n")


_MARGIN_REQUIRED = ("obs_collection", "hats_col_ra", "hats_col_dec", "hats_primary_table_url")
_INTEGER_KEYS = ("hats_nrows", "hats_col_healpix_order", "hats_order", "hats_estsize", "hats_margin_order")
_FLOAT_KEYS = ("hats_margin_threshold", "moc_sky_fraction")


def plain_margin_is_valid(directory: UPath) -> bool | None:
    """True when ``directory`` holds the properties of a margin as hats-margin writes them (plain
    ``key=value`` lines, every key a margin needs, numbers that parse), which hats accepts; None
    when only hats can judge (anything else, including no margin at all)."""
    for name in PROPERTIES_FILES:
        try:
            text = (directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            return None
        values = parse_properties(text)
        if not values or values.get("dataproduct_type") != "margin" or "hats_nrows" not in values:
            return None
        if not all(values.get(key) for key in (*_MARGIN_REQUIRED, "hats_margin_threshold")):
            return None
        try:
            for key in _INTEGER_KEYS:
                if key in values:
                    int(values[key])
            for key in _FLOAT_KEYS:
                if key in values:
                    float(values[key])
        except ValueError:
            return None
        return True
    return None

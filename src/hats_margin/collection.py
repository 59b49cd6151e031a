"""HATS collections: build the margin of a collection's primary, then register it in the collection.

A collection is a directory with a ``collection.properties`` file naming its primary catalog
(``hats_primary_table_url``) and, among others, its margins (``all_margins``, ``default_margin``).
Given a collection as input, planning builds the margin of the primary
(:func:`primary_path`); after a successful run the pipeline adds the margin to
``all_margins`` (and makes it ``default_margin`` when there is none) with
:func:`register_margin`, so ``lsdb.open_catalog(collection)`` finds it.

Only a margin written inside the collection directory is registered, under its path relative
to the collection (``output_path=<collection dir>`` gives ``all_margins=... <name>``). A margin
written elsewhere is left unregistered, with a warning.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from upath import UPath

from hats_margin.errors import InputCatalogError, describe_invalid
from hats_margin.io import as_upath, is_local

if TYPE_CHECKING:
    from hats.catalog.dataset.collection_properties import CollectionProperties

logger = logging.getLogger(__name__)

COLLECTION_FILE = "collection.properties"


def is_collection(path) -> bool:
    """True when ``path`` is a directory holding ``collection.properties``."""
    return (as_upath(path) / COLLECTION_FILE).exists()


def read_properties(path) -> CollectionProperties:
    """The collection's properties; InputCatalogError when the file is unreadable or invalid."""
    from hats.catalog.dataset.collection_properties import CollectionProperties  # only for collections (~1 s)

    path = as_upath(path)
    try:
        return CollectionProperties.read_from_dir(path)
    except (ValueError, OSError) as exc:
        raise InputCatalogError(
            f"{path / COLLECTION_FILE} is invalid: {describe_invalid(exc)}; fix that line of the file"
        ) from exc


def primary_path(path) -> UPath:
    """The primary catalog of a collection (relative entries resolve inside the collection),
    or ``path`` itself when it is not a collection."""
    path = as_upath(path)
    if not is_collection(path):
        return path
    from hats.catalog import CatalogCollection

    properties = read_properties(path)
    primary = CatalogCollection.resolve_inner_path(
        path, properties.hats_primary_table_url, storage_options=dict(path.storage_options)
    )
    # a properties file, not the directory: stores without listing (HTTP) cannot stat directories
    if not any((primary / name).exists() for name in ("hats.properties", "properties")):
        raise InputCatalogError(
            f"the collection {path} names its primary catalog {properties.hats_primary_table_url!r} "
            f"(hats_primary_table_url), but {primary} does not exist (no hats.properties there)"
        )
    logger.info("input %s is a HATS collection; building the margin of its primary %s", path, primary)
    return primary


def relative_inside(collection: UPath, target: UPath) -> str | None:
    """``target`` relative to ``collection`` (posix), or None when it is not inside it."""
    if is_local(collection) and is_local(target):
        outer, inner = Path(collection.path).resolve(), Path(target.path).resolve()
        return inner.relative_to(outer).as_posix() if inner.is_relative_to(outer) and inner != outer else None
    if collection.protocol != target.protocol:
        return None
    outer, inner = collection.path.rstrip("/") + "/", target.path.rstrip("/")
    return inner[len(outer):] if inner.startswith(outer) else None


def register_margin(collection, margin) -> str | None:
    """Add ``margin`` to the collection's ``all_margins`` (and ``default_margin`` when unset).

    Returns the name it is registered under (its path relative to the collection), or None
    (with a warning) when the margin is outside the collection directory. Registering the
    same margin twice changes nothing.
    """
    collection, margin = as_upath(collection), as_upath(margin)
    name = relative_inside(collection, margin)
    if name is None:
        warnings.warn(
            f"the margin {margin} is outside the collection {collection}, so it was not added to its "
            f"{COLLECTION_FILE}; to register it, build with output_path set to the collection directory",
            UserWarning,
            stacklevel=2,
        )
        return None
    properties = read_properties(collection)
    margins = list(properties.all_margins or [])
    default = properties.default_margin or name
    if name in margins and default == properties.default_margin:
        logger.info("margin %s is already registered in %s", name, collection)
        return name
    if name not in margins:
        margins.append(name)
    values = properties.model_dump(by_alias=True, exclude_none=True)
    values.update({"all_margins": margins, "default_margin": default})
    type(properties)(**values).to_properties_file(collection)
    logger.info("registered margin %s in %s (default margin: %s)", name, collection / COLLECTION_FILE, default)
    return name

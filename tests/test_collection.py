"""HATS collections as input: the margin of the primary, registered in collection.properties."""

from __future__ import annotations

import shutil

import lsdb
import pytest
from hats.catalog import TableProperties
from hats.catalog.dataset.collection_properties import CollectionProperties
from upath import UPath

from hats_margin import InputCatalogError, MarginCacheArguments, cli, collection, pipeline_with_client
from hats_margin.stages.planning import open_input

NAME = "small_sky_order1_10arcs"


@pytest.fixture
def coll(copy_catalog):
    return copy_catalog("small_sky_order1_collection")


def build(client, input_path, output_path, name=NAME, **kwargs):
    args = MarginCacheArguments(
        input_catalog_path=input_path, output_path=output_path, output_artifact_name=name,
        margin_threshold=10, progress_bar=False, **kwargs,
    )
    return pipeline_with_client(args, client)


def test_open_input_resolves_the_primary(coll):
    catalog = open_input(coll)
    assert catalog.path.name == "small_sky_order1"
    assert str(catalog.properties.catalog_type) == "object"


def test_missing_primary_is_a_clear_error(coll):
    shutil.rmtree(coll / "small_sky_order1")
    with pytest.raises(InputCatalogError, match="hats_primary_table_url"):
        open_input(coll)


def test_margin_is_registered_beside_the_existing_ones(client, coll):
    result = build(client, coll, coll)
    assert result.catalog_path.name == NAME
    props = CollectionProperties.read_from_dir(coll)
    assert props.all_margins == ["small_sky_order1_margin_1deg", "small_sky_order1_margin_2deg", NAME]
    assert props.default_margin == "small_sky_order1_margin_1deg", "an existing default is kept"
    assert props.all_indexes == {"id": "small_sky_order1_id_index"}, "other keys are untouched"
    margin_props = TableProperties.read_from_dir(coll / NAME)
    assert UPath(margin_props.primary_catalog).name == "small_sky_order1"

    catalog = lsdb.open_catalog(coll, margin_cache=NAME)
    assert catalog.margin is not None
    assert catalog.margin.hc_structure.catalog_info.margin_threshold == 10.0
    assert len(catalog.margin.compute()) == margin_props.total_rows

    # a second run (overwrite) registers nothing twice
    build(client, coll, coll, overwrite=True)
    assert CollectionProperties.read_from_dir(coll).all_margins.count(NAME) == 1


def test_first_margin_becomes_the_default(client, coll):
    props = CollectionProperties.read_from_dir(coll)
    values = props.model_dump(by_alias=True, exclude_none=True)
    for key in ("all_margins", "default_margin"):
        values.pop(key)
    CollectionProperties(**values).to_properties_file(coll)

    build(client, coll, coll)
    props = CollectionProperties.read_from_dir(coll)
    assert props.all_margins == [NAME] and props.default_margin == NAME
    catalog = lsdb.open_catalog(coll)  # no margin_cache: the collection's default margin
    assert catalog.margin.hc_structure.catalog_info.margin_threshold == 10.0


def test_margin_outside_the_collection_is_not_registered(client, coll, tmp_path):
    before = (coll / "collection.properties").read_text()
    with pytest.warns(UserWarning, match="outside the collection"):
        build(client, coll, tmp_path / "elsewhere")
    assert (coll / "collection.properties").read_text() == before
    assert (tmp_path / "elsewhere" / NAME / "hats.properties").exists()


def test_nested_margin_is_registered_by_relative_path(client, coll):
    build(client, coll, coll / "margins")
    assert CollectionProperties.read_from_dir(coll).all_margins[-1] == f"margins/{NAME}"
    catalog = lsdb.open_catalog(coll, margin_cache=f"margins/{NAME}")
    assert catalog.margin.hc_structure.catalog_info.margin_threshold == 10.0


def test_relative_inside():
    root = UPath("memory://bucket/coll")
    assert collection.relative_inside(root, root / "m") == "m"
    assert collection.relative_inside(root, UPath("memory://bucket/collection2/m")) is None
    assert collection.relative_inside(root, root) is None


def test_cli_build_of_a_collection(capsys, client, coll):
    code = cli.main(["build", str(coll), str(coll), "--threshold", "10", "--scheduler", client.scheduler.address,
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert NAME in CollectionProperties.read_from_dir(coll).all_margins  # default name from the primary

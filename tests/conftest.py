"""Shared fixtures: paths to the fixture catalogs, one session Dask client, input checksums."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from distributed import Client

from helpers import tree_checksum

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
CATALOGS = DATA / "catalogs"
REFERENCE_MARGINS = DATA / "reference_margins"
# The sample catalog lives once, in the package (``hats-margin demo`` needs it installed);
# tests/data/catalogs/small_sky_source_catalog is a symbolic link to it.
SAMPLE = REPO / "src" / "hats_margin" / "data" / "small_sky_source_catalog"
FIXTURE_ROOTS = [CATALOGS, REFERENCE_MARGINS, SAMPLE]


@pytest.fixture(scope="session")
def catalogs() -> Path:
    return CATALOGS


@pytest.fixture(scope="session")
def reference_margins() -> Path:
    return REFERENCE_MARGINS


@pytest.fixture(scope="session")
def client():
    """One in-process Dask client for the whole session (fast); tests that need worker
    processes make their own cluster."""
    with Client(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def inputs_are_never_modified():
    """The fixture catalogs are checksummed before and after the whole session; a missing
    fixture is an error, not a silent skip."""
    missing = [str(root) for root in FIXTURE_ROOTS if not root.is_dir()]
    assert not missing, f"fixture data missing from the repository: {missing}"
    before = {root: tree_checksum(root) for root in FIXTURE_ROOTS}
    yield
    after = {root: tree_checksum(root) for root in before}
    assert before == after, "a test modified the fixture catalogs"


@pytest.fixture
def copy_catalog(tmp_path):
    """Copy a fixture catalog into tmp_path (for tests that damage or extend it)."""

    def _copy(name: str, source_root: Path = CATALOGS) -> Path:
        target = tmp_path / "inputs" / Path(name).name
        shutil.copytree(source_root / name, target)
        return target

    return _copy

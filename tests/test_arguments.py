"""MarginCacheArguments: every rule, by message; no disk access while building arguments."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
from upath import UPath

from hats_margin import ArgumentError, MarginCacheArguments
from hats_margin.geometry import coarse_reach_arcsec


def make(tmp_path, **kwargs):
    base = {"input_catalog_path": tmp_path / "in", "output_path": tmp_path / "out", "output_artifact_name": "m"}
    return MarginCacheArguments(**(base | kwargs))


def test_defaults(tmp_path):
    args = make(tmp_path)
    assert args.margin_threshold == 5.0
    assert args.margin_order == 14
    assert args.fine_filtering is True
    assert (args.overwrite, args.resume, args.progress_bar) == (False, True, True)
    assert (args.dask_n_workers, args.dask_threads_per_worker) == (1, 1)
    assert args.catalog_path == UPath(tmp_path / "out" / "m")
    assert args.tmp_base == UPath(tmp_path / "out" / "m" / "intermediate")


def test_building_arguments_touches_no_disk(tmp_path):
    make(tmp_path, tmp_dir=tmp_path / "tmp", dask_tmp=tmp_path / "dask", resume=False, overwrite=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path_type", [str, Path, UPath])
def test_path_types_accepted(tmp_path, path_type):
    args = MarginCacheArguments(
        input_catalog_path=path_type(str(tmp_path / "in")), output_path=path_type(str(tmp_path)), output_artifact_name="m"
    )
    assert str(args.catalog_path).endswith("/m")


def test_tmp_dir_then_dask_tmp(tmp_path):
    assert make(tmp_path, tmp_dir=tmp_path / "t").tmp_base == UPath(tmp_path / "t" / "m" / "intermediate")
    assert make(tmp_path, dask_tmp=tmp_path / "d").tmp_base == UPath(tmp_path / "d" / "m" / "intermediate")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_artifact_name": "abc\n"}, "output_artifact_name 'abc\\n' contains invalid characters"),
        ({"npix_suffix": ".."}, "npix_suffix must be '/' (one directory per pixel) or a file extension"),
        ({"npix_suffix": ".parquet\n"}, "got '.parquet\\n'"),
        ({"npix_suffix": "/", "npix_parquet_name": "a.parquet\n"}, "npix_parquet_name must be a plain file name"),
    ],
)
def test_patterns_match_the_whole_value(tmp_path, kwargs, message):
    """Issue 13 item 12: '$' matched before a trailing newline, and '..' passed as a suffix."""
    with pytest.raises(ArgumentError) as info:
        make(tmp_path, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_catalog_path": None}, "input_catalog_path is required"),
        ({"input_catalog_path": ""}, "input_catalog_path is required"),
        ({"input_catalog_path": 5}, "input_catalog_path must be a str, Path or UPath"),
        ({"output_path": None}, "output_path is required"),
        ({"output_artifact_name": ""}, "output_artifact_name is required"),
        ({"output_artifact_name": "a/b"}, "output_artifact_name 'a/b' contains invalid characters"),
        ({"output_artifact_name": "a b"}, "contains invalid characters"),
        ({"output_artifact_name": ".."}, "contains invalid characters"),
        ({"output_artifact_name": "a\\b"}, "contains invalid characters"),
        ({"margin_threshold": 0}, "margin_threshold must be a finite angle > 0 (arcseconds unless a unit is given), got 0"),
        ({"margin_threshold": -5}, "margin_threshold must be a finite angle > 0"),
        ({"margin_threshold": math.nan}, "got nan"),
        ({"margin_threshold": math.inf}, "got inf"),
        ({"margin_threshold": "5 parsec"}, "margin_threshold '5 parsec' is not an angle: write it like 10 (arcsec)"),
        ({"margin_threshold": {5}}, "margin_threshold must be an angle like"),
        ({"margin_threshold": True}, "margin_threshold must be an angle like"),
        ({"margin_threshold": 1, "allow_extreme_threshold": "yes"}, "allow_extreme_threshold must be True or False"),
        ({"margin_order": 30}, "margin_order must be between 0 and 29, got 30"),
        ({"margin_order": -2}, "margin_order must be between 0 and 29, got -2"),
        ({"margin_order": 3.5}, "margin_order must be an integer"),
        ({"dask_n_workers": 0}, "dask_n_workers must be a positive integer, got 0"),
        ({"dask_threads_per_worker": -1}, "dask_threads_per_worker must be a positive integer"),
        ({"fine_filtering": "yes"}, "fine_filtering must be True or False"),
        ({"overwrite": 1}, "overwrite must be True or False"),
        ({"completion_email_address": "nobody"}, "completion_email_address must be an email address"),
        ({"smtp_port": 70000}, "smtp_port must be an integer 1..65535"),
        ({"npix_suffix": "parquet"}, "npix_suffix must be '/'"),
        ({"npix_suffix": "./x"}, "got './x'"),
        ({"npix_parquet_name": "a.parquet"}, "npix_parquet_name is only used with npix_suffix='/'"),
        ({"npix_suffix": "/", "npix_parquet_name": "a/b.parquet"}, "npix_parquet_name must be a plain file name"),
        ({"write_table_kwargs": "zstd"}, "write_table_kwargs must be a dict or None"),
        ({"addl_hats_properties": ["x"]}, "addl_hats_properties must be a dict or None"),
        ({"tmp_dir": 3}, "tmp_dir must be a str, Path, UPath or None"),
    ],
)
def test_invalid_values_name_the_argument(tmp_path, kwargs, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        make(tmp_path, **kwargs)


def test_argument_errors_are_value_errors(tmp_path):
    """Callers may catch the builtin; what they catch is still our ArgumentError with our message
    (not a ValueError from a computation on the bad value)."""
    with pytest.raises(ValueError, match=r"margin_threshold must be a finite angle > 0 \(arcseconds unless a unit is given\), got -1$") as info:
        make(tmp_path, margin_threshold=-1)
    assert type(info.value) is ArgumentError


def test_threshold_derives_order_and_keeps_user_value(tmp_path):
    args = make(tmp_path, margin_threshold=10)
    assert args.margin_order == 13 and args.margin_threshold == 10.0
    assert isinstance(args.margin_order, int) and isinstance(args.margin_threshold, float)


def test_order_alone_in_coarse_mode_sets_the_guaranteed_threshold(tmp_path):
    args = make(tmp_path, margin_order=8, fine_filtering=False)
    assert args.margin_threshold == pytest.approx(coarse_reach_arcsec(8))


def test_order_alone_in_exact_mode_keeps_default_threshold(tmp_path):
    args = make(tmp_path, margin_order=8)
    assert args.margin_threshold == 5.0 and args.margin_order == 8


def test_coarse_order_narrower_than_the_threshold_is_refused_naming_the_order_that_works(tmp_path):
    # issue 10 section 3: --threshold 60 --order 12 --coarse wrote a margin 15,267 rows short
    with pytest.raises(ArgumentError) as info:
        make(tmp_path, margin_threshold=60, margin_order=14, fine_filtering=False)
    message = str(info.value)
    assert "margin_order=14 cells are narrower" in message
    assert "Use margin_order <= 11" in message and "fine_filtering=True" in message
    assert f"give no margin_threshold to record the {coarse_reach_arcsec(14):.4g} arcsec" in message


def test_coarse_order_alone_records_the_threshold_it_honours(tmp_path):
    args = make(tmp_path, margin_order=14, fine_filtering=False)
    assert args.margin_threshold == pytest.approx(coarse_reach_arcsec(14)) and args.margin_threshold < 60


def test_too_fine_order_in_exact_mode_warns_about_speed(tmp_path):
    with pytest.warns(UserWarning, match="slower"):
        args = make(tmp_path, margin_threshold=3600, margin_order=14)
    assert (args.margin_threshold, args.margin_order) == (3600.0, 14)


def test_consistent_order_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(tmp_path, margin_threshold=10, margin_order=12, fine_filtering=False)
        make(tmp_path, margin_threshold=10, margin_order=13)


@pytest.mark.parametrize(
    ("value", "arcsec"),
    [(10, 10.0), ("10", 10.0), ("10arcsec", 10.0), ('10"', 10.0), ("1.5arcmin", 90.0), ("1.5'", 90.0),
     ("1deg", 3600.0), ("1d", 3600.0), ("500mas", 0.5), (" 2.5 arcsec ", 2.5), ("1e-3deg", 3.6)],
)
def test_threshold_units(tmp_path, value, arcsec):
    args = make(tmp_path, margin_threshold=value)
    assert args.margin_threshold == pytest.approx(arcsec) and isinstance(args.margin_threshold, float)


def test_threshold_from_an_astropy_quantity(tmp_path):
    import astropy.units as u

    assert make(tmp_path, margin_threshold=0.5 * u.arcmin).margin_threshold == pytest.approx(30.0)
    assert make(tmp_path, margin_threshold=10 * u.arcsec).margin_order == 13
    with pytest.raises(ArgumentError, match=r"margin_threshold .* is not an angle \(unit m\)"):
        make(tmp_path, margin_threshold=3 * u.m)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0028, "margin_threshold 0.0028 arcsec (2.8 mas) is below 0.01 arcsec; did you mean 0.0028 deg = 10.08 arcsec"),
        (50000, "margin_threshold 50000 arcsec (13.89 deg) is above 10 deg; did you mean 50000 mas = 50 arcsec?"),
        ("11deg", "margin_threshold 39600 arcsec (11 deg) is above 10 deg"),
    ],
)
def test_extreme_threshold_needs_confirmation_and_names_the_unit_mistake(tmp_path, value, expected):
    with pytest.raises(ArgumentError) as info:
        make(tmp_path, margin_threshold=value)
    assert str(info.value).startswith(expected)
    assert "pass allow_extreme_threshold=True to confirm" in str(info.value)
    confirmed = make(tmp_path, margin_threshold=value, allow_extreme_threshold=True)
    assert confirmed.margin_threshold == pytest.approx(float(value) if not isinstance(value, str) else 39600.0)


def test_thresholds_at_the_confirmation_limits_need_none(tmp_path):
    assert make(tmp_path, margin_threshold=0.01).margin_threshold == 0.01
    assert make(tmp_path, margin_threshold="10deg").margin_threshold == 36000.0

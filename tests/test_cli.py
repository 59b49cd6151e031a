"""The hats-margin command, in process (main([...]) with captured output) and once as a real subprocess."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types

import hats
import pytest
from hats.catalog import TableProperties
from hats.catalog.dataset.collection_properties import CollectionProperties

from hats_margin import cli


@pytest.fixture
def scheduler(client):
    """Address of the session's in-process cluster: builds run there instead of a new LocalCluster."""
    return client.scheduler.address


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize(
    ("arcsec", "expected"),
    [
        (3600, "1deg"),
        (7200, "2deg"),
        (5400, "1deg"),
        (3599, "59arcmin"),
        (60, "1arcmin"),
        (90, "1arcmin"),
        (59.9, "59arcs"),
        (10, "10arcs"),
        (5.5, "5arcs"),
        (1, "1arcs"),
        (0.5, "500mas"),
        (0.001, "1mas"),
    ],
)
def test_pretty_angle(arcsec, expected):
    assert cli.pretty_angle(arcsec) == expected


def test_default_margin_name():
    assert cli.default_margin_name("gaia", 10) == "gaia_10arcs"
    assert cli.default_margin_name("gaia", 60) == "gaia_1arcmin"
    assert cli.default_margin_name("small_sky_healpix13", 3600) == "small_sky_healpix13_1deg"


def test_parse_storage_options():
    options = cli.parse_storage_options(
        ["endpoint_url=http://127.0.0.1:9000", "anon=true", "use_ssl=False", "key=a=b",
         'client_kwargs={"region_name": "eu"}', "max_concurrency=8"]
    )
    assert options == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": True,
        "use_ssl": False,
        "key": "a=b",
        "client_kwargs": {"region_name": "eu"},
        "max_concurrency": 8,
    }
    with pytest.raises(ValueError, match="key=value"):
        cli.parse_storage_options(["no_equals_sign"])


def test_to_path_keeps_local_paths_and_gives_urls_their_options():
    assert cli.to_path("some/dir", {"anon": True}) == "some/dir"
    url = cli.to_path("memory://bucket/x", {"skip_instance_cache": True})
    assert url.protocol == "memory" and url.storage_options == {"skip_instance_cache": True}


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["build", "info", "verify", "demo"])
def test_every_command_has_help_with_examples(capsys, command):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    # the usage line always reads "hats-margin <command>": look at the examples section only,
    # and check that every example is this command and is accepted by the parser as written
    text = out.split("examples:", 1)[1].replace("\\\n", " ")
    examples = [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]
    assert len(examples) >= 2
    for argv in examples:
        assert argv[:2] == ["hats-margin", command], argv
        assert cli.build_parser().parse_args(argv[1:]).command == command


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    # the description also says "verify": look for each command's own line in the command list
    listed = re.findall(r"^    (\w+)(?:\s|$)", out, flags=re.MULTILINE)
    assert listed == ["build", "info", "verify", "demo"]


# ----------------------------------------------------------------------------- build
def test_build_with_default_name(capsys, catalogs, tmp_path, scheduler):
    code, out, err = run(
        capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "10",
        "--scheduler", scheduler, "--no-progress",
    )
    assert code == 0, err
    margin = tmp_path / "small_sky_source_catalog_10arcs"
    assert out.startswith("wrote ") and str(margin) in out and "exact" in out
    props = TableProperties.read_from_dir(margin)
    assert str(props.catalog_type) == "margin"
    assert props.margin_threshold == 10.0
    assert len(hats.read_hats(margin).get_healpix_pixels()) > 0


def test_build_options_reach_the_arguments(capsys, catalogs, tmp_path, scheduler, monkeypatch):
    received = []
    real_run = cli._run
    monkeypatch.setattr(cli, "_run", lambda args, sched: received.append(args) or real_run(args, sched))
    code, _, err = run(
        capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "60",
        "--name", "coarse_one", "--order", "9", "--coarse", "--tmp-dir", tmp_path / "scratch",
        "--scheduler", scheduler, "--no-progress", "--no-resume",
    )
    assert code == 0, err
    [args] = received  # options whose effect the output cannot show (tmp dir, resume, progress)
    assert (args.output_artifact_name, args.margin_threshold, args.margin_order) == ("coarse_one", 60.0, 9)
    assert (args.fine_filtering, args.resume, args.progress_bar) == (False, False, False)
    assert str(args.tmp_dir) == str(tmp_path / "scratch")
    extra = TableProperties.read_from_dir(tmp_path / "coarse_one").extra_dict(by_alias=True)
    assert extra["hats_margin_order"] == "9" or extra["hats_margin_order"] == 9
    assert str(extra["hats_margin_fine_filtering"]).lower() == "false"
    assert not (tmp_path / "scratch" / "coarse_one").exists(), "intermediate files are removed at the end"


def test_default_name_follows_the_threshold_rules(capsys, catalogs, tmp_path):
    code, out, err = run(
        capsys, "build", catalogs / "small_sky_object_catalog", tmp_path, "--threshold", "5400", "--dry-run"
    )
    assert code == 0, err
    assert str(tmp_path / "small_sky_object_catalog_1deg") in out


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, catalogs, tmp_path):
    output = tmp_path / "not_created"
    code, out, err = run(
        capsys, "build", catalogs / "small_sky_source_catalog", output, "--threshold", "10", "--dry-run"
    )
    assert code == 0, err
    assert not output.exists()
    assert "dry run" in out
    assert "14 (order 0: 1, order 1: 1, order 2: 12)" in out
    assert "negative tree" in out and "margin order 13" in out
    assert "17161" in out  # estimated rows read = the input's hats_nrows
    assert "map tasks:     14" in out


def test_existing_output_is_refused_without_overwrite(capsys, catalogs, tmp_path, scheduler):
    argv = ["build", catalogs / "small_sky_object_catalog", tmp_path, "--scheduler", scheduler, "--no-progress"]
    assert run(capsys, *argv)[0] == 0
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("hats-margin: error: ") and "--overwrite" in err
    assert run(capsys, *argv, "--overwrite")[0] == 0


def test_error_is_one_line_without_traceback(capsys, tmp_path, scheduler):
    code, out, err = run(
        capsys, "build", tmp_path / "missing", tmp_path / "out", "--threshold", "10",
        "--scheduler", scheduler, "--no-progress",
    )
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("hats-margin: error: ") and "does not exist" in err
    assert "Traceback" not in err


def test_verbose_shows_the_traceback(capsys, tmp_path, scheduler):
    code, _, err = run(
        capsys, "build", tmp_path / "missing", tmp_path / "out", "--verbose", "--scheduler", scheduler,
        "--no-progress",
    )
    assert code == 2
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("hats-margin: error: ")


def test_bad_values_are_errors_not_tracebacks(capsys, catalogs, tmp_path):
    code, _, err = run(capsys, "build", catalogs / "small_sky_object_catalog", tmp_path, "--threshold", "-1")
    assert code == 2 and "--threshold must be a finite angle > 0" in err and "Traceback" not in err
    assert "margin_threshold" not in err
    code, _, err = run(capsys, "build", catalogs / "small_sky_object_catalog", tmp_path, "--storage-option", "x")
    assert code == 2 and "key=value" in err


def test_scheduler_excludes_local_cluster_options(capsys, catalogs, tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli.main(["build", str(catalogs / "small_sky_object_catalog"), str(tmp_path),
                  "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"])
    assert stop.value.code == 2
    assert "--scheduler" in capsys.readouterr().err


# ----------------------------------------------------------------------------- info
def test_info_of_a_catalog(capsys, catalogs):
    code, out, _ = run(capsys, "info", catalogs / "small_sky_source_catalog")
    assert code == 0
    assert "type:          source" in out and "rows:          17161" in out
    assert "partitions:    14 (order 0: 1, order 1: 1, order 2: 12)" in out


def test_info_of_a_margin(capsys, catalogs, tmp_path, scheduler):
    assert run(capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "10",
               "--scheduler", scheduler, "--no-progress")[0] == 0
    code, out, _ = run(capsys, "info", tmp_path / "small_sky_source_catalog_10arcs")
    assert code == 0
    assert "type:          margin" in out
    assert "threshold:     10 arcsec (exact, margin order 13)" in out
    assert "small_sky_source_catalog" in out.split("primary:")[1]


def test_info_of_a_collection(capsys, catalogs):
    code, out, _ = run(capsys, "info", catalogs / "small_sky_order1_collection")
    assert code == 0
    lines = out.splitlines()
    assert "type:          collection" in lines and "primary:       small_sky_order1" in lines
    # the collection holds two margins; info must name the one collection.properties makes the default
    props = CollectionProperties.read_from_dir(catalogs / "small_sky_order1_collection")
    assert props.default_margin == "small_sky_order1_margin_1deg" and len(props.all_margins) == 2
    assert f"default margin: {props.default_margin}" in lines
    assert f"margins:       {' '.join(props.all_margins)}" in lines


def test_info_of_something_else_is_an_error(capsys, tmp_path):
    code, _, err = run(capsys, "info", tmp_path)
    assert code == 2 and "neither a HATS catalog nor a collection" in err


# ----------------------------------------------------------------------------- verify
@pytest.fixture
def fake_verify(monkeypatch):
    """Stands in for hats_margin.verify (its own tests live with it); records the call."""
    calls = []

    class Report:
        def __init__(self, ok):
            self.ok = ok

        def summary(self):
            return f"margin check: {'OK' if self.ok else 'FAILED: 3 rows missing'}"

    module = types.ModuleType("hats_margin.verify")

    def verify_margin(margin_path, primary_path, **options):
        calls.append((str(margin_path), str(primary_path)))
        options.pop("client")
        calls.append(options)
        return Report(ok="good" in str(margin_path))

    module.verify_margin = verify_margin
    monkeypatch.setitem(sys.modules, "hats_margin.verify", module)
    return calls


DEFAULT_VERIFY_OPTIONS = {"threshold_arcsec": None, "exact": None, "max_examples": 20, "progress_bar": True}


def test_verify_prints_the_summary_and_exits_by_the_result(capsys, fake_verify, scheduler):
    code, out, _ = run(capsys, "verify", "good_margin", "--primary", "cat", "--scheduler", scheduler)
    assert code == 0 and out.strip() == "margin check: OK"
    code, out, _ = run(capsys, "verify", "bad_margin", "--primary", "cat", "--scheduler", scheduler)
    assert code == 1 and "FAILED" in out
    assert fake_verify[::2] == [("good_margin", "cat"), ("bad_margin", "cat")]


def test_verify_primary_defaults_to_the_margins_own(capsys, fake_verify, scheduler):
    assert run(capsys, "verify", "good_margin", "--scheduler", scheduler)[0] == 0
    assert fake_verify == [("good_margin", "None"), DEFAULT_VERIFY_OPTIONS]


def test_verify_has_the_checkers_options(capsys, fake_verify, scheduler):
    """One command line: threshold, exact/coarse and examples go through hats-margin verify."""
    argv = ["verify", "good_margin", "--scheduler", scheduler, "--no-progress"]
    assert run(capsys, *argv, "--threshold", "5", "--coarse", "--max-examples", "3")[0] == 0
    assert run(capsys, *argv, "--exact")[0] == 0
    assert fake_verify[1] == {"threshold_arcsec": 5.0, "exact": False, "max_examples": 3, "progress_bar": False}
    assert fake_verify[3] == DEFAULT_VERIFY_OPTIONS | {"exact": True, "progress_bar": False}
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--max-examples", "-1"])
    assert stop.value.code == 2 and "--max-examples: expected a whole number >= 0, got '-1'" in capsys.readouterr().err


def test_verify_with_the_real_checker(capsys, catalogs, tmp_path, scheduler):
    primary = catalogs / "small_sky_source_catalog"
    assert run(capsys, "build", primary, tmp_path, "--threshold", "10", "--scheduler", scheduler,
               "--no-progress")[0] == 0
    margin = tmp_path / "small_sky_source_catalog_10arcs"
    code, out, _ = run(capsys, "verify", margin, "--primary", primary)
    assert code == 0 and "OK" in out
    next((margin / "dataset").rglob("Npix=*.parquet")).unlink()  # lose a margin pixel
    code, out, _ = run(capsys, "verify", margin, "--primary", primary)
    assert code == 1 and "FAILED" in out


# ----------------------------------------------------------------------------- demo
def test_demo_builds_the_sample_and_overwrites_a_previous_run(capsys, tmp_path, scheduler):
    assert cli.sample_catalog().is_dir()
    for _ in range(2):
        code, out, err = run(capsys, "demo", tmp_path, "--scheduler", scheduler)
        assert code == 0, err
        assert out.count("\n") == 1 and out.startswith("wrote ") and "threshold 10 arcsec" in out
        assert "Mapping" in err  # progress bars
    props = TableProperties.read_from_dir(tmp_path / "small_sky_source_catalog_10arcs")
    assert str(props.catalog_type) == "margin"


def test_demo_default_output_is_demo_output(capsys, tmp_path, monkeypatch, scheduler):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "demo", "--scheduler", scheduler, "--no-progress", "--plot")
    assert code == 0, err
    margin = tmp_path / "demo_output" / "small_sky_source_catalog_10arcs"
    assert (margin / "hats.properties").exists() and (margin / "margin_sky_map.png").exists()


# ----------------------------------------------------------------------------- a real process
def test_python_m_hats_margin_build_subprocess(catalogs, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hats_margin", "build", str(catalogs / "small_sky_object_catalog"), str(tmp_path),
         "--threshold", "3600", "--workers", "1", "--threads", "1", "--no-progress"],
        check=False, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote ") and "small_sky_object_catalog_1deg" in done.stdout
    assert (tmp_path / "small_sky_object_catalog_1deg" / "hats.properties").exists()


# ----------------------------------------------------------------------------- issue 10: units, names, messages
@pytest.mark.parametrize(
    ("threshold", "name"),
    [("10", "10arcs"), ("10arcsec", "10arcs"), ('10"', "10arcs"), ("1.5arcmin", "1arcmin"), ("1deg", "1deg"),
     ("500mas", "500mas")],
)
def test_threshold_with_units_on_the_command_line(capsys, catalogs, tmp_path, threshold, name):
    code, out, err = run(capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", threshold,
                         "--dry-run")
    assert code == 0, err
    assert str(tmp_path / f"small_sky_source_catalog_{name}") in out


def test_extreme_threshold_is_refused_naming_the_flag_and_the_likely_unit(capsys, catalogs, tmp_path):
    argv = ["build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "0.0028", "--dry-run"]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("hats-margin: error: --threshold 0.0028 arcsec (2.8 mas) is below 0.01 arcsec; "
                          "did you mean 0.0028 deg = 10.08 arcsec")
    assert "pass --allow-extreme-threshold to confirm" in err and err.count("\n") == 1
    code, out, err = run(capsys, *argv, "--allow-extreme-threshold")
    assert code == 0, err
    assert str(tmp_path / "small_sky_source_catalog_2mas") in out


def test_coarse_margin_gets_its_own_default_name(capsys, catalogs, tmp_path, scheduler):
    argv = ["build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "10", "--scheduler", scheduler,
            "--no-progress"]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv, "--coarse")
    assert code == 0, err
    assert (tmp_path / "small_sky_source_catalog_10arcs" / "hats.properties").exists()
    assert (tmp_path / "small_sky_source_catalog_10arcs_coarse" / "hats.properties").exists()


def test_coarse_order_too_fine_for_the_threshold_is_refused_before_work(capsys, catalogs, tmp_path):
    code, out, err = run(capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "60",
                         "--order", "12", "--coarse", "--no-progress")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("hats-margin: error: --order=12 cells are narrower")
    assert "Use --order <= 11" in err and "UserWarning" not in err
    assert list(tmp_path.iterdir()) == []


def test_warnings_are_one_line(capsys, catalogs, tmp_path):
    code, _, err = run(capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "3600",
                       "--order", "14", "--dry-run")
    from hats_margin.geometry import coarse_order_for_threshold

    assert code == 0
    assert err == (
        "hats-margin: warning: --order=14 is much finer than --threshold=3600.0 arcsec needs; the margin stays "
        f"exact but the candidate search is slower. --order={coarse_order_for_threshold(3600)} would be faster.\n"
    )


def test_dry_run_estimates_the_margin_rows_and_warns_when_above_the_primary(capsys, catalogs, tmp_path):
    code, out, _ = run(capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "10",
                       "--dry-run")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("margin rows:"))
    estimate = int(line.split("~")[1].split()[0])
    assert 5 <= estimate <= 100 and "WARNING" not in line  # the real margin holds 24 rows
    code, out, _ = run(capsys, "build", catalogs / "small_sky_source_catalog", tmp_path, "--threshold", "5deg",
                       "--dry-run")
    line = next(x for x in out.splitlines() if x.startswith("margin rows:"))
    assert "WARNING: more than the primary's 17161 rows" in line


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "x holds a catalog; pass overwrite=True (CLI: --overwrite) or choose another output_artifact_name",
            "x holds a catalog; pass --overwrite or choose another --name",
        ),
        ("input_catalog_path /a does not exist", "INPUT /a does not exist"),
        ("output_path /o is a file", "OUTPUT_PATH /o is a file"),
        ("dask_n_workers must be a positive integer", "--workers must be a positive integer"),
        ("use margin_order <= 11 or fine_filtering=True", "use --order <= 11 or the exact mode (no --coarse)"),
        ("line one\n  line two", "line one line two"),
        ("the_output_path_x is not an argument name", "the_output_path_x is not an argument name"),
    ],
)
def test_messages_name_command_line_flags(message, expected):
    assert cli.cli_message(message) == expected


def test_the_command_exits_at_once_with_its_code_its_output_flushed_and_atexit_run(tmp_path):
    """cli.run ends the process with os._exit after main(): the exit code, everything printed,
    and the atexit handlers (Dask's, tqdm's, a script's) survive it."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "from hats_margin.cli import run\n"
        "sys.argv = ['hats-margin', *sys.argv[1:]]\n"
        "run(sys.argv[1:])\n"
        "print('not reached')\n"
    )
    ok = subprocess.run([sys.executable, "-c", code, "demo", str(tmp_path / "out"), "--no-progress"],
                        capture_output=True, text=True, timeout=240, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote 24 margin rows") and "not reached" not in ok.stdout
    assert marker.read_text() == "yes"
    bad = subprocess.run([sys.executable, "-c", code, "build", str(tmp_path / "missing"), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("does not exist") and bad.stderr.startswith("hats-margin: error:")

"""The ``hats-margin`` command (also ``python -m hats_margin``): parses and delegates.

Commands: ``build`` (the pipeline), ``info`` (what a catalog is), ``verify`` (check a margin
against its primary), ``demo`` (build a margin for the sample catalog shipped in the package).
Errors print one line, ``hats-margin: error: <message>``, and exit with code 2 (1 for
unexpected errors); ``--verbose`` adds the traceback and INFO logging.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from importlib import resources
from typing import NoReturn

from upath import UPath

from hats_margin.errors import HatsMarginError

logger = logging.getLogger(__name__)

PROG = "hats-margin"
DEMO_THRESHOLD_ARCSEC = 10.0

BUILD_EXAMPLES = """\
examples:
  hats-margin build gaia/ margins/ --threshold 10                 # -> margins/gaia_10arcs (bare number: arcsec)
  hats-margin build gaia/ margins/ --threshold 1arcmin --workers 8  # -> margins/gaia_1arcmin
  hats-margin build gaia/ margins/ --threshold 500mas             # -> margins/gaia_500mas (also 10\", 1.5', 1deg)
  hats-margin build gaia/ margins/ --threshold 10 --coarse        # -> margins/gaia_10arcs_coarse
  hats-margin build gaia/ margins/ --threshold 5 --threshold 1arcmin  # -> gaia_5arcs, gaia_1arcmin, one read
  hats-margin build gaia/ margins/ --threshold 10arcsec --dry-run # show the plan and row estimate, write nothing
  hats-margin build gaia/ margins/ --scheduler tcp://10.0.0.5:8786
  hats-margin build my_collection/ my_collection/ --threshold 10  # margin of the primary, registered
  hats-margin build s3://bucket/gaia s3://bucket/margins --threshold 10 --tmp-dir /scratch/tmp \\
      --storage-option endpoint_url=https://s3.example.org --storage-option anon=false
"""

INFO_EXAMPLES = """\
examples:
  hats-margin info margins/gaia_10arcs
  hats-margin info my_collection/
"""

VERIFY_EXAMPLES = """\
examples:
  hats-margin verify margins/gaia_10arcs --primary gaia/
  hats-margin verify margins/gaia_10arcs        # primary from the margin's hats_primary_table_url
  hats-margin verify margins/gaia_10arcs --workers 4 --threshold 5 --coarse
"""

DEMO_EXAMPLES = """\
examples:
  hats-margin demo                 # writes ./demo_output/small_sky_source_catalog_10arcs
  hats-margin demo /tmp/margin_demo --plot
"""


# ----------------------------------------------------------------------------- pure helpers
def pretty_angle(arcsec: float) -> str:
    """hats-import's short angle for names: ``3600 -> 1deg``, ``60 -> 1arcmin``, ``10 -> 10arcs``,
    ``0.5 -> 500mas`` (truncated, not rounded)."""
    from hats_margin.units import short_angle

    return short_angle(arcsec)


def default_margin_name(primary_name: str, threshold_arcsec: float, coarse: bool = False) -> str:
    """``<primary name>_<angle>``, e.g. ``gaia_10arcs``; a coarse margin adds ``_coarse`` so that it
    never takes the exact margin's name."""
    return f"{primary_name}_{pretty_angle(threshold_arcsec)}" + ("_coarse" if coarse else "")


# Python argument spellings in messages -> the command line's flags
_FLAG_NAMES = [
    ("allow_extreme_threshold=True", "--allow-extreme-threshold"),
    ("overwrite=True", "--overwrite"),
    ("resume=False", "--no-resume"),
    ("fine_filtering=False", "--coarse"),
    ("fine_filtering=True", "the exact mode (no --coarse)"),
    ("output_artifact_name", "--name"),
    ("margin_threshold", "--threshold"),
    ("margin_order", "--order"),
    ("input_catalog_path", "INPUT"),
    ("output_path", "OUTPUT_PATH"),
    ("dask_n_workers", "--workers"),
    ("dask_threads_per_worker", "--threads"),
    ("dask_tmp", "--dask-tmp"),
    ("tmp_dir", "--tmp-dir"),
    ("completion_email_address", "--email"),
    ("create_plot", "--plot"),
]
_CLI_ASIDE = re.compile(r" \(CLI: [^)]*\)")


def cli_message(message: str) -> str:
    """A library message in command-line words: Python argument names become flags, and asides
    like ``(CLI: --overwrite)`` go; one line."""
    text = _CLI_ASIDE.sub("", message)
    for python_name, flag in _FLAG_NAMES:
        text = re.sub(rf"(?<![\w.-]){re.escape(python_name)}(?![\w])", flag, text)
    return " ".join(text.split())


def parse_storage_options(items: list[str] | None) -> dict:
    """``["key=value", ...]`` -> dict; ``true``/``false`` become booleans, JSON objects,
    arrays and numbers are decoded, anything else stays a string."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option expects key=value, got {item!r}")
        options[key.strip()] = _option_value(value)
    return options


def _option_value(text: str):
    """A ``--storage-option`` value: true/false as bool, JSON numbers, arrays and objects decoded, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if text[:1] in "{[" or lowered.lstrip("-").replace(".", "", 1).isdigit():
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def to_path(value: str | None, storage_options: dict):
    """A URL (``s3://...``) becomes a UPath carrying the storage options; a local path stays a str."""
    if value is None:
        return None
    if "://" in value:
        return UPath(value, **storage_options)
    return value


# ----------------------------------------------------------------------------- commands
def _build(opts) -> int:
    """``hats-margin build``: make the arguments from the options, then plan only (``--dry-run``) or build; exit code 0."""
    from hats_margin.arguments import MarginCacheArguments
    from hats_margin.errors import ArgumentError

    storage = parse_storage_options(opts.storage_option)
    kwargs = {
        "input_catalog_path": to_path(opts.input, storage),
        "output_path": to_path(opts.output_path, storage),
        "margin_threshold": opts.threshold,
        "allow_extreme_threshold": opts.allow_extreme_threshold,
        "margin_order": opts.order,
        "fine_filtering": not opts.coarse,
        "overwrite": opts.overwrite,
        "resume": not opts.no_resume,
        "tmp_dir": to_path(opts.tmp_dir, storage),
        "dask_tmp": opts.dask_tmp,
        "dask_n_workers": 1 if opts.workers is None else opts.workers,
        "dask_threads_per_worker": 1 if opts.threads is None else opts.threads,
        "progress_bar": not opts.no_progress,
        "completion_email_address": opts.email or "",
        "create_plot": opts.plot,
        "check_input": opts.check_input,
    }
    thresholds = opts.threshold or [None]
    kwargs["margin_threshold"] = thresholds[0] if len(thresholds) == 1 else thresholds
    names = opts.name or []
    if len(names) > 1 and len(names) != len(thresholds):
        raise ArgumentError(
            f"--name given {len(names)} times for {len(thresholds)} --threshold values: give one --name per "
            "--threshold (same order), or none (default names)"
        )
    if not names:
        with warnings.catch_warnings():  # the real construction below warns once
            warnings.simplefilter("ignore")
            probe = MarginCacheArguments(**kwargs, output_artifact_name="margin")
        values = probe.margin_threshold if probe.margins else [probe.margin_threshold]
        primary = _primary_name(kwargs["input_catalog_path"])
        names = [default_margin_name(primary, value, coarse=opts.coarse) for value in values]
    args = MarginCacheArguments(**kwargs, output_artifact_name=names if len(names) > 1 else names[0])
    if opts.dry_run:
        from hats_margin.info import describe_plan
        from hats_margin.stages.planning import make_plan

        print("\n\n".join(describe_plan(make_plan(m)) for m in (args.margins or [args])))
        return 0
    print(_run(args, opts.scheduler).summary())
    return 0


def _primary_name(input_path) -> str:
    """The primary's catalog name (for a collection, its primary's), else the directory name.
    A missing input is reported here, before anything heavy loads (on stores that can list:
    an HTTP server cannot say a directory exists; planning reports a missing catalog there)."""
    from hats_margin.io import as_upath, lists_partitions
    from hats_margin.prechecks import check_input_directory, plain_properties

    path = as_upath(input_path)
    if lists_partitions(path):
        path = check_input_directory(path)
    if (path / "collection.properties").exists():
        from hats_margin import collection

        try:
            path = collection.primary_path(path)
        except (OSError, ValueError):  # planning reports the real problem with the input
            return path.name or "margin"
    return plain_properties(path).get("obs_collection") or path.name or "margin"


def _run(args, scheduler: str | None):
    """Run the pipeline on a local cluster, or on the Dask scheduler at ``scheduler`` if given."""
    from hats_margin.orchestrator import pipeline, pipeline_with_client

    if scheduler is None:
        return pipeline(args)
    from distributed import Client

    with Client(scheduler) as client:
        return pipeline_with_client(args, client)


def _info(opts) -> int:
    """``hats-margin info``: print what is at the path (catalog, margin or collection)."""
    from hats_margin.info import describe_path

    print(describe_path(to_path(opts.path, parse_storage_options(opts.storage_option))))
    return 0


def _verify(opts) -> int:
    """``hats-margin verify``: check a margin against its primary; exit code 0 if it passes, 1 if not."""
    try:
        from hats_margin.verify import verify_margin
    except ImportError as exc:
        raise HatsMarginError(f"verify is not available in this installation: {exc}") from exc
    from hats_margin.runner import dask_client

    storage = parse_storage_options(opts.storage_option)
    with dask_client(opts.scheduler, opts.workers or 1, opts.threads or 1) as client:
        report = verify_margin(
            to_path(opts.margin, storage),
            to_path(opts.primary, storage),  # None: the margin's hats_primary_table_url
            threshold_arcsec=opts.threshold,
            exact=opts.exact,
            max_examples=opts.max_examples,
            client=client,
            progress_bar=not opts.no_progress,
        )
    print(report.summary())
    return 0 if report.ok else 1


def sample_catalog():
    """The sample catalog shipped in the package (a Traversable; a directory on disk)."""
    return resources.files("hats_margin") / "data" / "small_sky_source_catalog"


def _demo(opts) -> int:
    """``hats-margin demo``: build a margin of the bundled sample catalog into ``output_path`` (overwriting)."""
    from hats_margin.arguments import MarginCacheArguments

    with resources.as_file(sample_catalog()) as sample:
        args = MarginCacheArguments(
            input_catalog_path=sample,
            output_path=opts.output_path,
            output_artifact_name=default_margin_name(sample.name, DEMO_THRESHOLD_ARCSEC),
            margin_threshold=DEMO_THRESHOLD_ARCSEC,
            overwrite=True,
            resume=False,
            progress_bar=not opts.no_progress,
            dask_n_workers=1 if opts.workers is None else opts.workers,
            dask_threads_per_worker=1 if opts.threads is None else opts.threads,
            create_plot=opts.plot,
        )
        print(_run(args, opts.scheduler).summary())
    return 0


# ----------------------------------------------------------------------------- parser
def _non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0, else an argparse error naming the text."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser):
    """Add ``--verbose``."""
    parser.add_argument("--verbose", "-v", action="store_true", help="INFO logging, and tracebacks on errors")


def _add_storage(parser: argparse.ArgumentParser):
    """Add the repeatable ``--storage-option KEY=VALUE``."""
    parser.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE", default=[],
        help="fsspec storage option for every URL path (s3://, gs://, ...), repeatable: "
        "endpoint_url=..., key=..., secret=..., anon=true",
    )


def _add_runtime(parser: argparse.ArgumentParser):
    """Add ``--workers``, ``--threads``, ``--scheduler`` and ``--no-progress``."""
    group = parser.add_argument_group("where it runs (a local cluster, or an existing scheduler)")
    group.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster (1)")
    group.add_argument("--threads", type=int, metavar="T", help="threads per worker of the local cluster (1)")
    group.add_argument("--scheduler", metavar="ADDRESS", help="use a running Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``hats-margin`` argument parser, one subcommand per command; each sets ``func`` to run it."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build, inspect and verify HATS margin caches.",
        epilog="Run 'hats-margin COMMAND --help' for each command's options and examples.",
        formatter_class=formatter,
    )
    from hats_margin._version import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build", help="build the margin cache of a catalog (or of a collection's primary)",
        description="Build the margin cache of INPUT into OUTPUT_PATH/NAME.",
        epilog=BUILD_EXAMPLES, formatter_class=formatter,
    )
    build.add_argument("input", metavar="INPUT", help="HATS catalog or collection (path or URL)")
    build.add_argument(
        "output_path", metavar="OUTPUT_PATH",
        help="directory that receives the margin directory (for a collection: the collection itself, "
        "to register the margin)",
    )
    build.add_argument(
        "--threshold", metavar="ANGLE", action="append",
        help="margin width: a number of arcsec, or with a unit: 10arcsec, 10\", 1.5arcmin, 1.5', 1deg, 500mas (5); "
        "repeat it to build one margin per width from one read of the catalog",
    )
    build.add_argument(
        "--allow-extreme-threshold", action="store_true",
        help="confirm a threshold below 0.01 arcsec or above 10 deg (usually a unit mistake)",
    )
    build.add_argument(
        "--name", action="append",
        help="margin catalog name (default: <primary name>_<threshold>, e.g. gaia_10arcs; gaia_10arcs_coarse "
        "with --coarse); with several --threshold, one --name per threshold, or one base name",
    )
    build.add_argument("--order", type=int, metavar="K", help="margin order (default: from the threshold)")
    build.add_argument(
        "--coarse", action="store_true",
        help="hats-import's coarse margin (whole margin-order cells) instead of the exact one",
    )
    build.add_argument("--tmp-dir", metavar="D", help="intermediate files (default: --dask-tmp, else the output)")
    build.add_argument("--dask-tmp", metavar="D", help="local directory of the Dask workers")
    build.add_argument("--overwrite", action="store_true", help="replace an existing catalog at the output")
    build.add_argument("--no-resume", action="store_true", help="discard an interrupted run's work, start over")
    build.add_argument("--email", metavar="ADDRESS", help="send a success/failure email here (SMTP, see README)")
    build.add_argument("--plot", action="store_true", help="also write margin_sky_map.png beside the catalog")
    build.add_argument("--dry-run", action="store_true", help="print the plan and exit, writing nothing")
    build.add_argument(
        "--check-input", action="store_true",
        help="check every row's ra/dec against its spatial index (reads ra/dec of every row; by default only "
        "the rows the margin search reads are checked)",
    )
    _add_runtime(build)
    _add_storage(build)
    _add_common(build)
    build.set_defaults(func=_build)

    info = commands.add_parser(
        "info", help="what a catalog, margin or collection is",
        description="Print type, rows, partitions, and for a margin its threshold and primary.",
        epilog=INFO_EXAMPLES, formatter_class=formatter,
    )
    info.add_argument("path", metavar="PATH")
    _add_storage(info)
    _add_common(info)
    info.set_defaults(func=_info)

    verify = commands.add_parser(
        "verify", help="check a margin against its primary catalog",
        description="Check that MARGIN holds exactly the rows it should; exit 1 when it does not.",
        epilog=VERIFY_EXAMPLES, formatter_class=formatter,
    )
    verify.add_argument("margin", metavar="MARGIN")
    verify.add_argument(
        "--primary", metavar="CATALOG", help="the primary catalog (default: the margin's hats_primary_table_url)"
    )
    verify.add_argument(
        "--threshold", type=float, metavar="ARCSEC", help="check at this threshold (default: the margin's)"
    )
    mode = verify.add_mutually_exclusive_group()
    mode.add_argument(
        "--exact", dest="exact", action="store_true", default=None,
        help="extra rows fail (default: when the margin says it is exact)",
    )
    mode.add_argument("--coarse", dest="exact", action="store_false", help="extra rows are allowed")
    verify.add_argument(
        "--max-examples", type=_non_negative_int, default=20, metavar="N", help="examples shown per kind of problem (20)"
    )
    _add_runtime(verify)
    _add_storage(verify)
    _add_common(verify)
    verify.set_defaults(func=_verify)

    demo = commands.add_parser(
        "demo", help="build a 10 arcsec margin for the sample catalog shipped with hats-margin",
        description="Build a 10 arcsec margin of the bundled small_sky_source_catalog into OUTPUT_PATH "
        "(replacing an earlier demo output) and print a summary.",
        epilog=DEMO_EXAMPLES, formatter_class=formatter,
    )
    demo.add_argument("output_path", metavar="OUTPUT_PATH", nargs="?", default="demo_output",
                      help="where to write the demo margin (default: ./demo_output)")
    demo.add_argument("--plot", action="store_true", help="also write margin_sky_map.png beside the margin")
    _add_runtime(demo)
    _add_common(demo)
    demo.set_defaults(func=_demo)
    return parser


# ----------------------------------------------------------------------------- entry point
class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (works under test capture)."""

    def emit(self, record):
        """Print the formatted record to the current ``sys.stderr``."""
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def _configure_logging(verbose: bool):
    """With ``verbose``, log the package at INFO to stderr; else leave logging to the caller's set-up."""
    package = logging.getLogger("hats_margin")
    for handler in [h for h in package.handlers if isinstance(h, _StderrHandler)]:
        package.removeHandler(handler)
    if verbose:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
    else:
        package.setLevel(logging.NOTSET)


def _error(message: str, code: int) -> int:
    """Print ``hats-margin: error: <message>`` to stderr and return ``code`` (the exit code)."""
    print(f"{PROG}: error: {cli_message(message)}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line, ``hats-margin: warning: ...`` (no file path, no source line)."""
    text = str(message).strip() or category.__name__
    print(f"{PROG}: warning: {cli_message(text)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hats-margin`` command; returns the exit code.

    0 on success, 1 for a failed verify or an unexpected error, 2 for a bad value (one-line
    message; a traceback only with ``--verbose``), 130 when interrupted. Options argparse rejects
    exit with 2 from argparse itself.
    """
    parser = build_parser()
    opts = parser.parse_args(argv)
    if getattr(opts, "scheduler", None) and (opts.workers is not None or opts.threads is not None):
        parser.error("--scheduler uses the workers of that scheduler: drop --workers/--threads")
    _configure_logging(opts.verbose)
    with warnings.catch_warnings():
        if not opts.verbose:
            warnings.showwarning = _show_warning
        return _main(opts)


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``hats-margin`` and ``python -m hats_margin`` commands: :func:`main`, then exit at once.

    Everything the command wrote is closed by then; what is left of a normal interpreter exit is
    tearing down every imported module (numpy, pyarrow, pandas, Dask...), about 0.3-0.5 s of CPU
    that the user would wait for. So, once the output streams and logging are flushed, non-daemon
    threads joined and ``atexit`` handlers run (Dask's, tqdm's), the process ends with
    ``os._exit``. ``main()`` itself (tests, scripts) returns as usual.
    """
    code = main(argv)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - anything odd: the ordinary exit
        sys.exit(code)
    os._exit(code)


def _main(opts) -> int:
    """Run the chosen command, turning exceptions into a one-line message and an exit code."""
    try:
        return opts.func(opts)
    except (HatsMarginError, ValueError, FileNotFoundError) as exc:
        if opts.verbose:
            traceback.print_exc()
        return _error(str(exc), 2)
    except PermissionError as exc:
        if opts.verbose:
            traceback.print_exc()
        where = exc.filename or exc.strerror or exc
        return _error(
            f"permission denied on {where} (a read-only file system or directory, or permissions): choose an "
            "output_path (and --tmp-dir) you can write, or fix the permissions", 2,
        )
    except KeyboardInterrupt:
        return _error("interrupted; run the same command again to resume where it stopped", 130)
    except Exception as exc:  # noqa: BLE001 - one line, unless --verbose
        if opts.verbose:
            traceback.print_exc()
        return _error(f"{type(exc).__name__}: {exc} (run with --verbose for the traceback)", 1)

"""Time hats-margin against the I/O floor and the established importer, in one invocation.

    python benchmarks/run_benchmark.py --catalog PATH --threshold 10 --workers 1 --repeats 1
    python benchmarks/run_benchmark.py --rows 500000 --max-rows-per-partition 2500 --out results.json
    python benchmarks/run_benchmark.py --catalog PATH --scaling

Runs (each a separate subprocess, all with the same worker count, after one untimed pass that
puts the catalog in the page cache), each the way a user runs it: the tool's own ``pipeline(args)``,
which starts its own local Dask cluster from the arguments:

* ``exact``: the ``hats-margin build`` command (``cli.run``, which calls ``pipeline(args)``; one
  worker runs as threads in the command's process, more are worker processes);
* ``coarse``: the same with ``--coarse``;
* ``importer``: hats-import 0.11.1's ``pipeline(args)`` with its margin arguments (coarse by
  construction; it starts a local cluster of worker processes), if importable and not
  ``--no-importer``;
* ``floor``: ``benchmarks/floor.py``: read every partition once, write as many rows as the exact
  margin has (falls back to coarse, then importer) with the same parquet settings.

For each run: whole-command wall time (process start to exit: what the user waits for), CPU time
(user + sys) of the whole process tree (less sensitive than wall time to other load on the
machine), the time in the pipeline (hats-margin: the command's ``pipeline()`` call less its
cluster start and stop; hats-import: inside its ``pipeline_with_client``, which its ``pipeline()`` calls once
its cluster is up; the floor: read + write), the cluster's start and stop, per-stage times
(``result.stage_seconds`` for hats-margin; for the importer, from its progress-bar stages), peak
RSS of the process tree sampled every 50 ms (max of the sum over the process and all its
children, i.e. the Dask workers and nannies, and max of a single process; shared pages are
counted once per process), and the rows (``hats_nrows``) and bytes (files under ``dataset/``)
written. With ``--repeats R`` every run is repeated and the median repeat (by in-pipeline time)
is reported.

Generated catalogs and outputs go under ``--data-dir`` (default ``bench-data`` beside the repository), never
into the repository.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_SRC = BENCH_DIR.parent / "src"
MARKER = "BENCH_JSON "

# ---------------------------------------------------------------------------------------------
# Child programs (run with ``python -c CODE CONFIG_JSON``)
# ---------------------------------------------------------------------------------------------

OURS_CHILD = r"""
import json, sys, time
start = time.perf_counter()
cfg = json.loads(sys.argv[1])
import psutil
from hats_margin import orchestrator
from hats_margin.stages import finishing

# count the intermediate files just before the run deletes them (instrumentation, not the package)
intermediate = {}
_clean_up = finishing.clean_up
def counting_clean_up(plan):
    files = [p for p in plan.layout.base.rglob("*") if p.is_file()]
    intermediate["files"] = len(files)
    intermediate["bytes"] = sum(p.stat().st_size for p in files)
    return _clean_up(plan)
finishing.clean_up = counting_clean_up

def tree_cpu():
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total

# time the pipeline() call the command makes (its own local cluster: one worker runs as threads in
# this process, more are worker processes)
_pipeline = orchestrator._pipeline
def timed_pipeline(args, client):
    called, cpu_called = time.perf_counter(), tree_cpu()
    result = _pipeline(args, client)
    done, cpu_done = time.perf_counter(), tree_cpu()
    stages = {str(k): float(v) for k, v in dict(result.stage_seconds).items()}
    cluster = stages.get("cluster start", 0.0) + stages.get("cluster stop", 0.0)
    print("BENCH_JSON " + json.dumps({
        "in_pipeline_seconds": done - called - cluster,
        "cluster_seconds": cluster,
        "setup_seconds": called - start,
        "stage_seconds": stages,
        "reported_rows": int(result.total_rows),
        "in_pipeline_cpu_seconds": cpu_done - cpu_called,
        "intermediate_files": intermediate.get("files"),
        "intermediate_bytes": intermediate.get("bytes"),
    }), flush=True)
    return result
orchestrator._pipeline = timed_pipeline

# what a user runs: the hats-margin command, start to exit
from hats_margin.cli import run
run([
    "build", cfg["catalog"], cfg["output_path"], "--name", cfg["artifact"], "--threshold", str(cfg["threshold"]),
    "--workers", str(cfg["workers"]), "--threads", "1", "--dask-tmp", cfg["dask_tmp"], "--tmp-dir", cfg["tmp_dir"],
    "--overwrite", "--no-progress", *([] if cfg["fine_filtering"] else ["--coarse"]),
])
"""

IMPORTER_CHILD = r"""
import json, sys, time
start = time.perf_counter()
cfg = json.loads(sys.argv[1])
import importlib
importer_pipeline = importlib.import_module("hats_import.pipeline")  # the module (the package exports a function of that name)
import hats_import.pipeline_resume_plan as resume_plan_module
from hats_import.margin_cache.margin_cache_arguments import MarginCacheArguments

# Time the importer's stages by the end of each progress bar (one per stage).
stage_ends = []
original_print_progress = resume_plan_module.print_progress

class _TimedContext:
    def __init__(self, bar, name):
        self.bar, self.name = bar, name
    def __enter__(self):
        return self.bar.__enter__()
    def __exit__(self, *exc):
        stage_ends.append((self.name, time.perf_counter()))
        return self.bar.__exit__(*exc)

def _timed_iter(bar, name):
    try:
        yield from bar
    finally:
        stage_ends.append((name, time.perf_counter()))

def timed_print_progress(iterable=None, total=None, stage_name=None, **kwargs):
    bar = original_print_progress(iterable=iterable, total=total, stage_name=stage_name, **kwargs)
    name = str(stage_name).lower()
    return _timed_iter(bar, name) if iterable is not None else _TimedContext(bar, name)

resume_plan_module.print_progress = timed_print_progress

# the time inside pipeline_with_client, which hats-import's pipeline() calls once its client is up
inside = {}
original_with_client = importer_pipeline.pipeline_with_client
def timed_with_client(args, client):
    inside["start"] = time.perf_counter()
    try:
        return original_with_client(args, client)
    finally:
        inside["end"] = time.perf_counter()
importer_pipeline.pipeline_with_client = timed_with_client

args = MarginCacheArguments(
    input_catalog_path=cfg["catalog"],
    output_path=cfg["output_path"],
    output_artifact_name=cfg["artifact"],
    margin_threshold=cfg["threshold"],
    dask_n_workers=cfg["workers"],
    dask_threads_per_worker=1,
    progress_bar=False,
    tmp_dir=cfg["tmp_dir"],
    dask_tmp=cfg["dask_tmp"],
)
# what a user runs: hats-import's pipeline(args) starts its own local cluster
called = time.perf_counter()
importer_pipeline.pipeline(args)
done = time.perf_counter()
stages, previous = {}, inside["start"]
for name, end in stage_ends:
    stages[name] = stages.get(name, 0.0) + (end - previous)
    previous = end
print("BENCH_JSON " + json.dumps({
    "in_pipeline_seconds": inside["end"] - inside["start"],
    "cluster_seconds": (done - called) - (inside["end"] - inside["start"]),
    "setup_seconds": called - start,
    "stage_seconds": stages,
    "reported_rows": None,
}), flush=True)
"""


# ---------------------------------------------------------------------------------------------
# Measuring one subprocess
# ---------------------------------------------------------------------------------------------


class TreeMemorySampler(threading.Thread):
    """Samples the RSS of a process and all its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_sum = 0
        self.peak_single = 0
        self.peak_processes = 0
        self._stop_event = threading.Event()

    def run(self):
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            try:
                processes = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total, single = 0, 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                single = max(single, rss)
            self.peak_sum = max(self.peak_sum, total)
            self.peak_single = max(self.peak_single, single)
            self.peak_processes = max(self.peak_processes, len(processes))
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()


def _child_env(src: Path = REPO_SRC) -> dict[str, str]:
    env = dict(os.environ)
    # Benchmark this checkout's hats_margin (or --baseline-src's), installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def measure(command: list[str], log_prefix: Path, src: Path = REPO_SRC) -> dict:
    """Run ``command``; return wall time, peak RSS, exit code and the child's BENCH_JSON dict."""
    log_prefix.parent.mkdir(parents=True, exist_ok=True)
    stdout_path = log_prefix.with_suffix(".stdout")
    stderr_path = log_prefix.with_suffix(".stderr")
    load_before = os.getloadavg()[0]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=_child_env(src))
        sampler = TreeMemorySampler(process.pid)
        sampler.start()
        returncode = process.wait()
        wall = time.perf_counter() - start
        sampler.stop()
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    payload = {}
    for line in stdout_path.read_text().splitlines():
        if line.startswith(MARKER):
            payload = json.loads(line[len(MARKER) :])
    result = {
        "returncode": returncode,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_sum_bytes": sampler.peak_sum,
        "peak_rss_single_bytes": sampler.peak_single,
        "peak_processes": sampler.peak_processes,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "stdout_log": str(stdout_path),
        "stderr_log": str(stderr_path),
        **payload,
    }
    if returncode != 0 or not payload:
        result["error"] = "\n".join(stderr_path.read_text().splitlines()[-25:])
    return result


def _properties(catalog: Path) -> dict[str, str]:
    properties = {}
    path = catalog / "hats.properties"
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                properties[key.strip()] = value.strip()
    return properties


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _output_summary(catalog: Path) -> dict:
    properties = _properties(catalog)
    rows = properties.get("hats_nrows")
    return {
        "rows": int(rows) if rows is not None else None,
        "bytes": _bytes_under(catalog / "dataset"),
        "files": sum(1 for f in (catalog / "dataset").rglob("*.parquet") if not f.name.startswith("_")),
    }


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def _is_valid(catalog: Path) -> bool:
    from hats.io.validation import is_valid_catalog

    return bool(is_valid_catalog(catalog, strict=True))


def run_pipeline(
    kind: str, catalog: Path, work: Path, threshold: float, workers: int, tag: str, validate: bool = True,
    src: Path = REPO_SRC,
) -> dict:
    """One hats-margin (``exact``/``coarse``) or importer run in a fresh subprocess; ``src`` is the
    hats_margin source tree to run (another commit's, for a before/after comparison)."""
    run_dir = work / f"{tag}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = {
        "catalog": str(catalog),
        "output_path": str(run_dir / "out"),
        "artifact": f"margin_{kind}",
        "threshold": threshold,
        "fine_filtering": kind == "exact",
        "workers": workers,
        "tmp_dir": str(run_dir / "tmp"),
        "dask_tmp": str(run_dir / "dask-tmp"),
    }
    code = IMPORTER_CHILD if kind == "importer" else OURS_CHILD
    result = measure([sys.executable, "-c", code, json.dumps(config)], work / "logs" / tag, src)
    output = Path(config["output_path"]) / config["artifact"]
    result.update(_output_summary(output))
    if validate and not result.get("error"):
        result["valid_strict"] = _is_valid(output)
    result.update({"run": kind, "workers": workers, "output": str(output)})
    return result


def run_floor(catalog: Path, work: Path, rows: int, workers: int, tag: str) -> dict:
    run_dir = work / tag
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = [
        sys.executable,
        str(BENCH_DIR / "floor.py"),
        str(catalog),
        "--write-rows",
        str(rows),
        "--workers",
        str(workers),
        "--out-dir",
        str(run_dir),
    ]
    result = measure(command, work / "logs" / tag)
    result.update(
        {
            "run": "floor",
            "workers": workers,
            "in_pipeline_seconds": result.get("floor_seconds"),
            "stage_seconds": {
                "read": result.get("read_seconds", float("nan")),
                "write": result.get("write_seconds", float("nan")),
            },
            "rows": result.get("rows_written"),
            "bytes": result.get("bytes_written"),
            "files": result.get("files_written"),
            "output": str(run_dir),
        }
    )
    return result


def warm_page_cache(catalog: Path) -> float:
    """Read every file of the catalog once so that all runs see a warm page cache."""
    start = time.perf_counter()
    for path in sorted(catalog.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
    return time.perf_counter() - start


def importer_available() -> bool:
    return importlib.util.find_spec("hats_import") is not None


def best_of(results: list[dict]) -> dict:
    """The median successful repeat (by in-pipeline time; the lower one of an even count), with all
    repeats' times attached."""
    ok = [r for r in results if not r.get("error") and r.get("in_pipeline_seconds") is not None]
    if not ok:
        return results[-1]
    ranked = sorted(ok, key=lambda r: r["in_pipeline_seconds"])
    best = dict(ranked[(len(ranked) - 1) // 2])
    best["repeats_in_pipeline_seconds"] = [r["in_pipeline_seconds"] for r in ok]
    best["repeats_wall_seconds"] = [r["wall_seconds"] for r in ok]
    best["median_in_pipeline_seconds"] = statistics.median(best["repeats_in_pipeline_seconds"])
    best["median_wall_seconds"] = statistics.median(best["repeats_wall_seconds"])
    return best


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt_seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_intermediate(r: dict) -> str:
    if r.get("intermediate_files") is None:
        return "-"
    return f"{r['intermediate_files']} / {r['intermediate_bytes'] / 1e6:.1f}"


def _fmt_stages(stages: dict | None) -> str:
    if not stages:
        return "-"
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items())


def markdown_table(results: list[dict]) -> str:
    header = (
        "| run | workers | wall s | CPU s | in-pipeline s | in-pipeline CPU s | stages s | peak RSS sum MB | peak RSS max proc MB "
        "| rows | bytes | files | intermediate files / MB |"
    )
    lines = [
        header,
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(
                f"| {r['run']} | {r['workers']} | {_fmt_seconds(r.get('wall_seconds'))} | | FAILED "
                f"(exit {r.get('returncode')}) | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['run']} | {r['workers']} | {_fmt_seconds(r['wall_seconds'])} "
            f"| {_fmt_seconds(r.get('cpu_seconds'))} | {_fmt_seconds(r.get('in_pipeline_seconds'))} "
            f"| {_fmt_seconds(r.get('in_pipeline_cpu_seconds'))} | {_fmt_stages(r.get('stage_seconds'))} "
            f"| {r['peak_rss_sum_bytes'] / 2**20:.0f} | {r['peak_rss_single_bytes'] / 2**20:.0f} "
            f"| {r.get('rows') if r.get('rows') is not None else '-'} "
            f"| {r.get('bytes') if r.get('bytes') is not None else '-'} "
            f"| {r.get('files', '-')} | {_fmt_intermediate(r)} |"
        )
    return "\n".join(lines)


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compute_ratios(by_run: dict[str, dict]) -> dict[str, float | None]:
    def value(run, key):
        r = by_run.get(run)
        return None if r is None or r.get("error") else r.get(key)

    floor = value("floor", "in_pipeline_seconds")
    return {
        "exact_in_pipeline / floor": _ratio(value("exact", "in_pipeline_seconds"), floor),
        "coarse_in_pipeline / floor": _ratio(value("coarse", "in_pipeline_seconds"), floor),
        "importer_wall / exact_wall": _ratio(
            value("importer", "wall_seconds"), value("exact", "wall_seconds")
        ),
        "importer_wall / coarse_wall": _ratio(
            value("importer", "wall_seconds"), value("coarse", "wall_seconds")
        ),
        "importer_in_pipeline / exact_in_pipeline": _ratio(
            value("importer", "in_pipeline_seconds"), value("exact", "in_pipeline_seconds")
        ),
        "importer_in_pipeline / coarse_in_pipeline": _ratio(
            value("importer", "in_pipeline_seconds"), value("coarse", "in_pipeline_seconds")
        ),
        "exact / coarse (in-pipeline)": _ratio(
            value("exact", "in_pipeline_seconds"), value("coarse", "in_pipeline_seconds")
        ),
        "exact / coarse (wall)": _ratio(value("exact", "wall_seconds"), value("coarse", "wall_seconds")),
        "exact-base / exact (in-pipeline)": _ratio(
            value("exact-base", "in_pipeline_seconds"), value("exact", "in_pipeline_seconds")
        ),
        "exact-base_in_pipeline / floor": _ratio(value("exact-base", "in_pipeline_seconds"), floor),
        "exact_in_pipeline_cpu / floor_cpu": _ratio(
            value("exact", "in_pipeline_cpu_seconds"), value("floor", "in_pipeline_cpu_seconds")
        ),
        "coarse_in_pipeline_cpu / floor_cpu": _ratio(
            value("coarse", "in_pipeline_cpu_seconds"), value("floor", "in_pipeline_cpu_seconds")
        ),
        "exact-base_in_pipeline_cpu / floor_cpu": _ratio(
            value("exact-base", "in_pipeline_cpu_seconds"), value("floor", "in_pipeline_cpu_seconds")
        ),
        "exact-base / exact (in-pipeline CPU)": _ratio(
            value("exact-base", "in_pipeline_cpu_seconds"), value("exact", "in_pipeline_cpu_seconds")
        ),
    }


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio_lines(ratios: dict[str, float | None]) -> str:
    return "\n".join(f"- {name}: {_fmt_ratio(value)}" for name, value in ratios.items())


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def resolve_catalog(args) -> Path:
    if args.catalog:
        return Path(args.catalog).resolve()
    name = f"sky_{args.rows}_{args.max_rows_per_partition}_{args.seed}"
    path = Path(args.data_dir) / "catalogs" / name
    if (path / "hats.properties").exists():
        print(f"using cached catalog {path}")
        return path
    sys.path.insert(0, str(BENCH_DIR))
    from generate_catalog import generate

    summary = generate(
        path,
        rows=args.rows,
        max_rows_per_partition=args.max_rows_per_partition,
        row_group_size=args.row_group_size,
        seed=args.seed,
        overwrite=True,
    )
    print(
        f"generated {path}: {summary['partitions']} partitions in {summary['total_seconds']:.1f} s",
        flush=True,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--catalog", help="an existing HATS catalog")
    source.add_argument("--rows", type=int, help="generate (or reuse) a synthetic catalog of this many rows")
    parser.add_argument("--max-rows-per-partition", type=int, default=2500)
    parser.add_argument("--row-group-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=10.0, help="margin threshold, arcsec")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--importer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--runs",
        default="exact,coarse,importer,floor",
        help="comma-separated subset of exact,coarse,importer,floor (default: all)",
    )
    parser.add_argument("--scaling", action="store_true", help="also run exact mode with 1 and 2 workers")
    parser.add_argument(
        "--baseline-src",
        help="a hats_margin source tree of another commit (e.g. from `git archive`): adds the runs "
        "exact-base (and coarse-base with --runs), side by side with this checkout's",
    )
    parser.add_argument("--floor-rows", type=int, default=None, help="rows for the floor to write")
    parser.add_argument(
        "--data-dir",
        default=str(Path(__file__).resolve().parents[2] / "bench-data"),
        help="generated outputs (default: bench-data beside the repository)",
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the margins written")
    parser.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every margin with hats' strict is_valid_catalog (untimed)",
    )
    parser.add_argument("--out", help="write all results as JSON here")
    args = parser.parse_args(argv)
    if not args.catalog and not args.rows:
        parser.error("one of --catalog or --rows is required")

    catalog = resolve_catalog(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.data_dir) / "runs" / stamp
    work.mkdir(parents=True, exist_ok=True)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if args.baseline_src and "exact-base" not in runs:
        runs.append("exact-base")
    unknown = set(runs) - {"exact", "coarse", "importer", "floor", "exact-base", "coarse-base"}
    if unknown:
        parser.error(f"unknown runs: {sorted(unknown)}")
    if "importer" in runs and not (args.importer and importer_available()):
        print("importer: skipped (--no-importer or hats_import not importable)")
        runs.remove("importer")

    print(f"catalog {catalog}; threshold {args.threshold} arcsec; workers {args.workers}; work dir {work}")
    print(f"warming the page cache: {warm_page_cache(catalog):.2f} s", flush=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-min load average is {load:.2f} before starting: timings will be noisy")

    all_results: dict[str, list[dict]] = {run: [] for run in runs}

    def finish(result: dict) -> dict:
        print(
            f"  {result['tag']}: wall {_fmt_seconds(result.get('wall_seconds'))} s, in-pipeline "
            f"{_fmt_seconds(result.get('in_pipeline_seconds'))} s, rows {result.get('rows')}"
            + (f", strictly valid: {result['valid_strict']}" if "valid_strict" in result else "")
            + (f"\n    FAILED:\n{result['error']}" if result.get("error") else ""),
            flush=True,
        )
        if not args.keep_outputs:
            shutil.rmtree(work / result["tag"], ignore_errors=True)
        return result

    for repeat in range(args.repeats):
        for run in [r for r in runs if r != "floor"]:
            tag = f"{run}_w{args.workers}_r{repeat}"
            kind, _, base = run.partition("-")
            src = Path(args.baseline_src).resolve() if base else REPO_SRC
            result = run_pipeline(kind, catalog, work, args.threshold, args.workers, tag, args.validate, src)
            result["tag"] = tag
            result["run"] = run
            all_results[run].append(finish(result))
        if "floor" in runs:
            rows = args.floor_rows
            for source_run in ("exact", "coarse", "importer"):
                if rows is None:
                    done = [r for r in all_results.get(source_run, []) if r.get("rows") is not None]
                    rows = done[-1]["rows"] if done else None
            if rows is None:
                print("floor: skipped (no margin row count; pass --floor-rows)")
            else:
                tag = f"floor_w{args.workers}_r{repeat}"
                result = run_floor(catalog, work, rows, args.workers, tag)
                result["tag"] = tag
                all_results["floor"].append(finish(result))

    best = {run: best_of(results) for run, results in all_results.items() if results}
    order = [run for run in ("floor", "exact", "exact-base", "coarse", "coarse-base", "importer") if run in best]
    table = markdown_table([best[run] for run in order])
    ratios = compute_ratios(best)
    print()
    print(table)
    print()
    print(ratio_lines(ratios))
    if "coarse" in best and "importer" in best:
        coarse_rows, importer_rows = best["coarse"].get("rows"), best["importer"].get("rows")
        print(
            f"- coarse rows == importer rows: {coarse_rows == importer_rows} ({coarse_rows} vs {importer_rows})"
        )

    scaling = None
    if args.scaling:
        scaling_results = {}
        for workers in (1, 2):
            tag = f"scaling_exact_w{workers}"
            result = run_pipeline("exact", catalog, work, args.threshold, workers, tag, args.validate)
            result["tag"] = tag
            scaling_results[workers] = finish(result)
        print()
        print(markdown_table(list(scaling_results.values())))
        one, two = scaling_results[1], scaling_results[2]
        scaling = {
            "results": scaling_results,
            "speedup_in_pipeline": _ratio(one.get("in_pipeline_seconds"), two.get("in_pipeline_seconds")),
            "speedup_wall": _ratio(one.get("wall_seconds"), two.get("wall_seconds")),
        }
        print(
            f"\n- speedup 1 -> 2 workers (exact): in-pipeline {_fmt_ratio(scaling['speedup_in_pipeline'])}x, "
            f"wall {_fmt_ratio(scaling['speedup_wall'])}x ({os.cpu_count()} CPUs)"
        )

    if args.out:
        report = {
            "catalog": str(catalog),
            "catalog_properties": _properties(catalog),
            "threshold_arcsec": args.threshold,
            "workers": args.workers,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "python": sys.version,
            "results": all_results,
            "best": best,
            "ratios": ratios,
            "scaling": scaling,
            "table_markdown": table,
        }
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out}")
    failed = any(r.get("error") for results in all_results.values() for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

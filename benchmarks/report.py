"""Regenerate the README's results tables: every benchmark of the "Fast and lean" targets
(issue 11, and issue 10's whole-command times) in one invocation, with a target / measured /
met-or-missed table.

    python benchmarks/report.py --data-dir ../bench-data                    # everything (~40 min quiet)
    python benchmarks/report.py --data-dir ../bench-data --only sky_500k,demo
    python benchmarks/report.py --data-dir /tmp/bench --quick               # smoke run, small catalogs
    python benchmarks/report.py --data-dir DIR --catalog sky_10m=/data/sky_10m   # reuse a catalog

Each benchmark is one ``benchmarks/run_benchmark.py`` invocation (its runs side by side, same
worker count, median of ``--repeats``, each run in its own subprocess after a page-cache warm-up)
or ``benchmarks/startup.py`` for the demo; this script only chooses the catalogs and runs,
collects the JSON they write and compares the figures with the targets. Missing catalogs are
generated (seeded, deterministic) into ``--data-dir`` with ``generate_catalog.py`` /
``generate_shapes.py``; existing ones are reused as they are.

``--quick`` proves the wiring, not the targets: one repeat, no hats-import, no 2-worker run, the
1 M sky's thresholds cut to 10 and 3600 arcsec, and catalogs it has to generate are made small
(``<name>_quick``, e.g. 100 k rows instead of 1 M). The markdown goes to stdout and to ``--out``
(default ``DATA_DIR/report-<timestamp>.md``, with the raw JSON beside it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MIB = 2**20


@dataclass(frozen=True)
class Catalog:
    """A benchmark catalog: its directory name under the data dir and how to generate it."""

    name: str
    label: str
    generate: list[str]
    quick_generate: list[str]


CATALOGS = {
    "sky_10m": Catalog(
        "sky_10m", "sky",
        ["generate_catalog.py", "--rows", "10000000", "--max-rows-per-partition", "100000", "--seed", "0"],
        ["generate_catalog.py", "--rows", "200000", "--max-rows-per-partition", "2000", "--seed", "0"],
    ),
    "sky_500k": Catalog(
        "sky_500k", "sky",
        ["generate_catalog.py", "--rows", "500000", "--max-rows-per-partition", "2500", "--seed", "0"],
        ["generate_catalog.py", "--rows", "50000", "--max-rows-per-partition", "250", "--seed", "0"],
    ),
    "sky_1m": Catalog(
        "sky_1m", "all-sky",
        ["generate_catalog.py", "--rows", "1000000", "--max-rows-per-partition", "10000", "--seed", "0"],
        ["generate_catalog.py", "--rows", "100000", "--max-rows-per-partition", "1000", "--seed", "0"],
    ),
    "wide_5m": Catalog(
        "wide_5m", "wide, 110 columns",
        ["generate_shapes.py", "wide"],
        ["generate_shapes.py", "wide", "--rows", "600000", "--max-rows-per-partition", "200000"],
    ),
    "wide_200k": Catalog(
        "wide_200k", "real-shaped, 110 columns, 200k-row partitions",
        ["generate_shapes.py", "wide", "--rows", "4000000", "--max-rows-per-partition", "200000"],
        ["generate_shapes.py", "wide", "--rows", "400000", "--max-rows-per-partition", "20000"],
    ),
    "many_17k": Catalog(
        "many_17k", "many",
        ["generate_shapes.py", "many"],
        ["generate_shapes.py", "many", "--rows", "40000", "--max-rows-per-partition", "40"],
    ),
    "nested_500k": Catalog(
        "nested_500k", "nested light curves",
        ["generate_shapes.py", "nested"], ["generate_shapes.py", "nested", "--rows", "50000"],
    ),
}


@dataclass
class Benchmark:
    """One run_benchmark.py invocation (or the demo): catalog, runs, thresholds and targets."""

    name: str
    catalog: str | None
    runs: str = "exact,coarse,floor"
    thresholds: tuple[float, ...] = (10.0,)
    quick_thresholds: tuple[float, ...] | None = None
    scaling: bool = False
    repeats: int | None = None  # None: --repeats
    targets: list[str] = field(default_factory=list)


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark("sky_10m", "sky_10m", "exact,coarse,importer,floor", scaling=True,
                  targets=["floor<=1.5", "importer>=8", "scaling>=1.7", "exact/coarse", "files"]),
        Benchmark("sky_500k", "sky_500k", "exact,coarse,importer,floor",
                  targets=["floor<=2", "importer>=20", "exact/coarse", "files"]),
        Benchmark("wide", "wide_5m", targets=["floor<1.0", "exact/coarse", "memory", "files"]),
        Benchmark("real", "wide_200k", "exact,coarse,importer,floor",
                  targets=["importer>=8", "floor<=1.5", "memory", "files"]),
        Benchmark("many", "many_17k", repeats=1, targets=["per-partition", "exact/coarse", "files"]),
        Benchmark("nested", "nested_500k", targets=["exact/coarse", "memory", "files"]),
        Benchmark("sky_1m", "sky_1m", "exact,coarse", thresholds=(1.0, 10.0, 60.0, 3600.0),
                  quick_thresholds=(10.0, 3600.0), targets=["exact/coarse"]),
        Benchmark("demo", None, targets=["demo<=3", "errors<1"]),
        Benchmark("verify", None, targets=["verify<=build"]),
    ]
}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def load() -> float:
    return os.getloadavg()[0]


def catalog_path(key: str, data_dir: Path, overrides: dict[str, Path], quick: bool) -> Path:
    """The catalog's directory, generated (seeded) if it does not exist yet."""
    if key in overrides:
        return overrides[key]
    spec = CATALOGS[key]
    path = data_dir / (spec.name + ("_quick" if quick else ""))
    if (path / "hats.properties").exists():
        return path
    script, *args = spec.quick_generate if quick else spec.generate
    command = [sys.executable, str(BENCH_DIR / script)]
    command += [args[0], str(path), *args[1:]] if script == "generate_shapes.py" else [str(path), *args]
    print(f"generating {path}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    return path


def run_benchmark(bench: Benchmark, catalog: Path, threshold: float, opts, work: Path) -> dict:
    """One run_benchmark.py invocation; its JSON report (``returncode`` added)."""
    out = work / f"{bench.name}_{threshold:g}.json"
    runs = bench.runs
    if opts.quick or not opts.importer:
        runs = ",".join(r for r in runs.split(",") if r != "importer")
    repeats = 1 if opts.quick else (bench.repeats or opts.repeats)
    command = [
        sys.executable, str(BENCH_DIR / "run_benchmark.py"), "--catalog", str(catalog),
        "--threshold", str(threshold), "--workers", "1", "--repeats", str(repeats), "--runs", runs,
        "--data-dir", str(opts.data_dir), "--out", str(out),
    ]
    if bench.scaling and not opts.quick:
        command.append("--scaling")
    if not opts.validate:
        command.append("--no-validate")
    print(f"\n=== {bench.name}, {threshold:g} arcsec (load {load():.2f}): {' '.join(command[1:])}", flush=True)
    completed = subprocess.run(command, check=False)
    if not out.exists():
        return {"returncode": completed.returncode, "error": f"run_benchmark.py exited {completed.returncode}"}
    report = json.loads(out.read_text())
    report["returncode"] = completed.returncode
    return report


def run_demo(opts) -> dict:
    """benchmarks/startup.py: medians of the whole demo command and of the first two errors."""
    runs = 1 if opts.quick else opts.repeats
    command = [sys.executable, str(BENCH_DIR / "startup.py"), "--runs", str(runs)]
    print(f"\n=== demo (load {load():.2f}): {' '.join(command[1:])}", flush=True)
    before = load()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    print(completed.stdout + completed.stderr, flush=True)
    figures = {}
    for line in completed.stdout.splitlines():
        match = re.match(r"(demo \(whole command\)|bad input error|existing output error)\s+"
                         r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if match:
            figures[match.group(1)] = {"wall": float(match.group(2)), "cpu": float(match.group(5))}
    return {"returncode": completed.returncode, "cases": figures, "load_average_before": before, "runs": runs}


def run_verify(opts) -> dict:
    """Whole-command wall and CPU of ``hats-margin demo`` (the build) and of ``hats-margin verify``
    of its margin, alternated, medians of the repeats (after one untimed warm-up of each)."""
    import statistics
    import tempfile

    sys.path.insert(0, str(BENCH_DIR))
    from startup import DEMO_NAME, timed

    runs = 1 if opts.quick else opts.repeats
    command = [sys.executable, "-m", "hats_margin"]
    print(f"\n=== verify (load {load():.2f}): demo build then verify, {runs} runs each", flush=True)
    before = load()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="hats-margin-verify-") as tmp:
        build = [*command, "demo", tmp, "--no-progress"]
        check = [*command, "verify", str(Path(tmp) / DEMO_NAME), "--no-progress"]
        timed(build, env, 0)
        timed(check, env, 0)
        figures = {"build": [], "verify": []}
        for _ in range(runs):
            figures["build"].append(timed(build, env, 0))
            figures["verify"].append(timed(check, env, 0))
    cases = {name: {"wall": statistics.median(v[0] for v in values), "cpu": statistics.median(v[1] for v in values)}
             for name, values in figures.items()}
    print(cases, flush=True)
    return {"returncode": 0, "cases": cases, "load_average_before": before, "runs": runs}


def verify_rows(report: dict) -> list[tuple[str, str, str, str]]:
    build, check = report["cases"]["build"], report["cases"]["verify"]
    return [("verify (on Dask, bundled sample) takes no longer than building the margin",
             (f"verify {check['wall']:.2f} s wall / {check['cpu']:.2f} s CPU, build (`demo`) {build['wall']:.2f} s / "
             f"{build['cpu']:.2f} s (whole commands, median of {report['runs']})"),
             _verdict(check["wall"] <= build["wall"]), "")]


# ---------------------------------------------------------------------------------------------
# Catalog facts the targets need
# ---------------------------------------------------------------------------------------------


def catalog_rows(catalog: Path) -> str:
    """``hats_nrows`` of the catalog, as 10 M / 500 k / 1,234."""
    text = (catalog / "hats.properties").read_text()
    match = re.search(r"^hats_nrows\s*=\s*(\d+)", text, re.MULTILINE)
    if not match:
        return "?"
    rows = int(match.group(1))
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if rows >= size and rows % (size // 10) == 0:
            return f"{rows / size:g} {unit}"
    return f"{rows:,}"


def partition_count(catalog: Path) -> int:
    info = catalog / "partition_info.csv"
    return max(0, len(info.read_text().splitlines()) - 1) if info.exists() else 0


def largest_row_group_bytes(catalog: Path, candidates: int = 3) -> int:
    """The largest decoded row group of the catalog: Arrow's in-memory size (``Table.nbytes``)
    of the ``candidates`` row groups with the most uncompressed bytes in the parquet footers
    (``dataset/_metadata`` when present, otherwise every partition's footer)."""
    import pyarrow.parquet as pq

    dataset = catalog / "dataset"
    metadata = dataset / "_metadata"
    sizes = []  # (uncompressed bytes, file, row group index within that file)
    if metadata.exists():
        meta = pq.read_metadata(metadata)
        index_in_file: dict[str, int] = {}
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            name = group.column(0).file_path
            sizes.append((group.total_byte_size, dataset / name, index_in_file.get(name, 0)))
            index_in_file[name] = index_in_file.get(name, 0) + 1
    else:
        for path in sorted(dataset.rglob("*.parquet")):
            meta = pq.read_metadata(path)
            sizes += [(meta.row_group(i).total_byte_size, path, i) for i in range(meta.num_row_groups)]
    largest = 0
    for _, path, index in sorted(sizes, key=lambda s: s[0], reverse=True)[:candidates]:
        largest = max(largest, pq.ParquetFile(path).read_row_group(index).nbytes)
    return largest


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _ok(result: dict | None) -> bool:
    return bool(result) and not result.get("error") and result.get("in_pipeline_seconds") is not None


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _stages(result: dict) -> str:
    stages = result.get("stage_seconds") or {}
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items()) or "-"


def runs_table(measured: list[dict]) -> str:
    """One row per run: wall, in-pipeline wall and CPU, stages, memory, files, load before."""
    lines = [
        ("| catalog | threshold \" | run | wall s | in-pipeline s | in-pipeline CPU s | stages s "
        "| largest process MB | intermediate files / MB | rows written | load before |"),
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for item in measured:
        report = item["report"]
        label = item["label"]
        rows = [(run, report.get("best", {}).get(run)) for run in
                ("floor", "exact", "coarse", "importer")]
        scaling = (report.get("scaling") or {}).get("results") or {}
        rows += [(f"exact, {w} worker{'s' if str(w) != '1' else ''}", r) for w, r in scaling.items()]
        for run, r in rows:
            if r is None:
                continue
            if r.get("error"):
                lines.append(f"| {label} | {item['threshold']:g} | {run} | FAILED (exit {r.get('returncode')}) "
                             "| | | | | | | |")
                continue
            files = "-" if r.get("intermediate_files") is None else (
                f"{r['intermediate_files']:,} / {r['intermediate_bytes'] / 1e6:.1f}")
            lines.append(
                f"| {label} | {item['threshold']:g} | {run} | {_num(r.get('wall_seconds'))} "
                f"| {_num(r.get('in_pipeline_seconds'))} | {_num(r.get('in_pipeline_cpu_seconds'))} "
                f"| {_stages(r)} | {r['peak_rss_single_bytes'] / MIB:.0f} | {files} "
                f"| {_num(r.get('rows'), 0)} | {_num(r.get('load_average_before'))} |"
            )
            label = ""
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or not b else a / b


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**missed**")


def evaluate(bench: Benchmark, items: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, measured, met/missed, profile) rows for one benchmark's targets."""
    rows = []
    label = items[0]["label"] if items else bench.name
    for item in items:
        best = item["report"].get("best", {}) if "best" in item["report"] else {}
        floor, exact, coarse, importer = (best.get(k) for k in ("floor", "exact", "coarse", "importer"))
        t = item["threshold"]
        for target in bench.targets:
            if target.startswith("floor"):
                limit = float(re.sub(r"[^\d.]", "", target))
                strict = "<" in target and "<=" not in target
                wall = _ratio(exact and exact.get("in_pipeline_seconds"), floor and floor.get("in_pipeline_seconds"))
                cpu = _ratio(exact and exact.get("in_pipeline_cpu_seconds"),
                             floor and floor.get("in_pipeline_cpu_seconds"))
                met = None if wall is None else (wall < limit if strict else wall <= limit)
                rows.append((f"{label}: in-pipeline {'<' if strict else '<='} {limit:g}x floor",
                             f"{_num(wall)}x wall, {_num(cpu)}x CPU", _verdict(met),
                             f"exact: {_stages(exact)}; floor: {_stages(floor)}" if _ok(exact) and _ok(floor) else ""))
            elif target.startswith("importer"):
                limit = float(target[len("importer>="):])
                if importer is None:
                    rows.append((f"{label}: whole command >= {limit:g}x faster than hats-import",
                                 "hats-import not run (--quick, --no-importer or not installed)", _verdict(None), ""))
                    continue
                e = _ratio(importer.get("wall_seconds"), exact and exact.get("wall_seconds"))
                c = _ratio(importer.get("wall_seconds"), coarse and coarse.get("wall_seconds"))
                met = None if e is None else e >= limit
                rows.append((f"{label}: whole command >= {limit:g}x faster than hats-import",
                             f"{_num(e)}x (exact), {_num(c)}x (coarse)", _verdict(met),
                             f"exact wall {_num(exact.get('wall_seconds'))} s, of which in-pipeline "
                             f"{_num(exact.get('in_pipeline_seconds'))} s" if _ok(exact) else ""))
            elif target.startswith("scaling"):
                scaling = item["report"].get("scaling")
                if not scaling:
                    rows.append((f"{label}: 2 workers >= 1.7x faster than 1 (wall)", "not run (--quick)",
                                 _verdict(None), ""))
                    continue
                wall, inside = scaling.get("speedup_wall"), scaling.get("speedup_in_pipeline")
                two = scaling["results"].get("2") or scaling["results"].get(2) or {}
                rows.append((f"{label}: 2 workers >= 1.7x faster than 1 (wall)",
                             f"{_num(wall)}x wall, {_num(inside)}x in-pipeline",
                             _verdict(None if wall is None else wall >= 1.7),
                             f"2 workers: {_stages(two)}" if _ok(two) else ""))
            elif target == "exact/coarse":
                r = _ratio(exact and exact.get("in_pipeline_seconds"), coarse and coarse.get("in_pipeline_seconds"))
                cpu = _ratio(exact and exact.get("in_pipeline_cpu_seconds"),
                             coarse and coarse.get("in_pipeline_cpu_seconds"))
                rows.append((f"{label} ({t:g}\"): exact <= 1.1x coarse (in-pipeline)",
                             (f"{_num(r)}x wall, {_num(cpu)}x CPU; rows {_num(exact and exact.get('rows'), 0)} "
                             f"vs {_num(coarse and coarse.get('rows'), 0)}"),
                             _verdict(None if r is None else r <= 1.1),
                             f"exact: {_stages(exact)}; coarse: {_stages(coarse)}" if _ok(exact) and _ok(coarse) else ""))
            elif target == "memory":
                bound = 2 * item["largest_row_group"] / MIB + 300
                peaks = [r["peak_rss_single_bytes"] / MIB for r in (exact, coarse) if _ok(r)]
                met = None if not peaks else max(peaks) <= bound
                rows.append((f"{label}: largest process <= 2x largest decoded row group + 300 MB",
                             (f"{' / '.join(f'{p:.0f}' for p in peaks) or '-'} MiB (exact / coarse) vs "
                             f"2 x {item['largest_row_group'] / MIB:.1f} + 300 = {bound:.1f} MiB"),
                             _verdict(met), ""))
            elif target == "files":
                parts = item["partitions"]
                if not _ok(exact) or exact.get("intermediate_files") is None:
                    rows.append((f"{label}: intermediate files O(map tasks)", "-", _verdict(None), ""))
                    continue
                # One shard and one marker per map task, one marker per margin pixel (at most one
                # per partition on these all-sky catalogs) and a few fixed files: O(map tasks).
                allowed = 3 * parts + 10
                rows.append((f"{label}: intermediate files O(map tasks), not O(source x destination)",
                             (f"{exact['intermediate_files']:,} files / {exact['intermediate_bytes'] / 1e6:.1f} MB "
                             f"for {parts:,} partitions, {exact.get('files') or 0:,} margin files "
                             f"(bound 3 x partitions + 10 = {allowed:,})"),
                             _verdict(exact["intermediate_files"] <= allowed), ""))
            elif target == "per-partition":
                if not (_ok(exact) and _ok(floor)):
                    rows.append((f"{label}: mapping + reducing overhead <= 3 ms per partition", "-",
                                 _verdict(None), ""))
                    continue
                stages = exact.get("stage_seconds") or {}
                work = stages.get("mapping", 0.0) + stages.get("reducing", 0.0)
                over = (work - floor["in_pipeline_seconds"]) / item["partitions"] * 1000
                rows.append((f"{label}: mapping + reducing overhead <= 3 ms per partition",
                             (f"{over:.1f} ms ((mapping + reducing {work:.2f} s - floor {floor['in_pipeline_seconds']:.2f}"
                             f" s) / {item['partitions']:,} partitions); {work / item['partitions'] * 1000:.1f} ms "
                             "without subtracting the floor"), _verdict(over <= 3), f"exact: {_stages(exact)}"))
    return rows


def demo_rows(report: dict) -> list[tuple[str, str, str, str]]:
    cases = report.get("cases", {})
    demo = cases.get("demo (whole command)")
    errors = [cases.get("bad input error"), cases.get("existing output error")]
    rows = [("demo: whole command (bundled sample) <= 3 s",
             "-" if demo is None else f"{demo['wall']:.2f} s wall, {demo['cpu']:.2f} s CPU "
             f"(median of {report['runs']})", _verdict(None if demo is None else demo["wall"] <= 3), "")]
    if all(errors):
        rows.append(("first errors (missing input, existing output) < 1 s from the command line",
                     " / ".join(f"{e['wall']:.2f} s" for e in errors),
                     _verdict(all(e["wall"] < 1 for e in errors)), ""))
    return rows


def targets_table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| target | measured | status | profile (stage split, s) |", "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {s} | {p or '-'} |" for t, m, s, p in rows]
    return "\n".join(lines)


def machine_facts(start_load: float) -> str:
    import dask
    import psutil
    import pyarrow

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return (f"Machine: {os.cpu_count()} cores ({model or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"pyarrow {pyarrow.__version__}, dask {dask.__version__}; load average at start "
            f"{start_load:.2f} (each run's load before it is in the table).")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR.parents[1] / "bench-data",
                        help="catalogs (generated if missing) and run outputs (default: bench-data beside the repo)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="one repeat, no hats-import or 2-worker run, fewer thresholds, small generated catalogs")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per run (median reported; many: 1)")
    parser.add_argument("--catalog", action="append", default=[], metavar="NAME=PATH",
                        help=f"use an existing catalog for NAME (one of {','.join(CATALOGS)})")
    parser.add_argument("--importer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=False,
                        help="check every margin with hats' strict validation (untimed; slow on many)")
    parser.add_argument("--out", type=Path, help="markdown file (default DATA_DIR/report-<timestamp>.md)")
    opts = parser.parse_args(argv)

    names = list(BENCHMARKS) if not opts.only else [n.strip() for n in opts.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    overrides = {}
    for spec in opts.catalog:
        key, sep, value = spec.partition("=")
        if not sep or key not in CATALOGS:
            parser.error(f"--catalog {spec!r}: expected NAME=PATH with NAME one of {', '.join(CATALOGS)}")
        if not (Path(value) / "hats.properties").exists():
            parser.error(f"--catalog {spec!r}: {value} is not a HATS catalog (no hats.properties)")
        overrides[key] = Path(value).resolve()
    opts.data_dir = opts.data_dir.resolve()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    work = opts.data_dir / "reports" / stamp
    work.mkdir(parents=True, exist_ok=True)
    out = opts.out or opts.data_dir / f"report-{stamp}.md"

    start, start_load = time.perf_counter(), load()
    measured, target_rows, raw = [], [], {}
    for name in names:
        bench = BENCHMARKS[name]
        if bench.name == "demo":
            raw[name] = report = run_demo(opts)
            target_rows += demo_rows(report)
            continue
        if bench.name == "verify":
            raw[name] = report = run_verify(opts)
            target_rows += verify_rows(report)
            continue
        catalog = catalog_path(bench.catalog, opts.data_dir, overrides, opts.quick)
        facts = {"partitions": partition_count(catalog), "largest_row_group": largest_row_group_bytes(catalog)}
        label = (f"{CATALOGS[bench.catalog].label}: {catalog_rows(catalog)} rows, "
                 f"{facts['partitions']:,} partitions")
        thresholds = bench.quick_thresholds if opts.quick and bench.quick_thresholds else bench.thresholds
        items = []
        for threshold in thresholds:
            report = run_benchmark(bench, catalog, threshold, opts, work)
            raw[f"{name}_{threshold:g}"] = report
            items.append({"label": label, "threshold": threshold, "report": report, **facts})
        measured += items
        target_rows += evaluate(bench, items)

    elapsed = time.perf_counter() - start
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join([
        (f"Generated by `python benchmarks/report.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{when}, {elapsed / 60:.1f} min{' (--quick: wiring only, not the targets)' if opts.quick else ''}."),
        machine_facts(start_load),
        targets_table(target_rows),
        runs_table(measured) if measured else "",
    ]).strip() + "\n"
    print("\n" + text)
    out.write_text(text)
    (work / "report.json").write_text(json.dumps(raw, indent=2, default=str))
    print(f"wrote {out} (raw results: {work / 'report.json'})")
    failed = any(r.get("returncode") for r in raw.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

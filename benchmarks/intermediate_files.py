"""Intermediate files and map-stage cost of one margin build (issue 11: pay per byte, not per file).

    python benchmarks/intermediate_files.py ../bench-data/sky_500k --threshold 10 --rounds 3

Runs ``pipeline()`` in-process (default arguments: one worker, one thread, in this process, so
this process's CPU time is the run's) ``--rounds`` times after an uncounted warm-up, and prints
one JSON line per round: intermediate files just before the clean-up (run.json, markers,
shards), CPU and wall time of the map stage (``orchestrator._map_stage``) and of the whole call.
Works on any version of the package that has ``orchestrator._map_stage`` (compare two checkouts
with PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import hats_margin
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hats_margin

from hats_margin import MarginCacheArguments, orchestrator, pipeline
from hats_margin.stages import finishing


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def measure(catalog: Path, threshold: float, workdir: Path) -> dict:
    """One build into a fresh directory (deleted afterwards)."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    seen: dict = {}
    real_map, real_clean = orchestrator._map_stage, finishing.clean_up

    def timed_map(*args, **kwargs):
        cpu, wall = _cpu(), time.perf_counter()
        try:
            return real_map(*args, **kwargs)
        finally:
            seen["map_cpu"], seen["map_wall"] = _cpu() - cpu, time.perf_counter() - wall

    def counting_clean_up(plan):
        base = Path(plan.layout.base.path)
        files = [p for p in base.rglob("*") if p.is_file()]
        seen["intermediate_files"] = len(files)
        seen["markers"] = sum(1 for p in files if p.parent.name == "mapping")
        seen["shards"] = sum(1 for p in files if p.suffix == ".arrow")
        return real_clean(plan)

    orchestrator._map_stage, finishing.clean_up = timed_map, counting_clean_up
    try:
        args = MarginCacheArguments(input_catalog_path=str(catalog), output_path=str(out), output_artifact_name="m",
                                    margin_threshold=threshold, progress_bar=False)
        cpu, wall = _cpu(), time.perf_counter()
        result = pipeline(args)
        seen["total_cpu"], seen["total_wall"] = _cpu() - cpu, time.perf_counter() - wall
        seen["rows"] = result.total_rows
    finally:
        orchestrator._map_stage, finishing.clean_up = real_map, real_clean
        shutil.rmtree(out, ignore_errors=True)
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog", type=Path)
    parser.add_argument("--threshold", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where the outputs go (default: a temp dir)")
    options = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(dir=options.workdir))
    try:
        measure(options.catalog, options.threshold, workdir)  # warm-up: page cache, imports, numba
        for _ in range(options.rounds):
            row = measure(options.catalog, options.threshold, workdir)
            row.update(package=str(Path(hats_margin.__file__).parent), load=os.getloadavg()[0])
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

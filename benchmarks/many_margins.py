"""Several margins from one read vs the largest margin alone (issue 12, section 2).

    python benchmarks/many_margins.py ../bench-data/sky_10m --thresholds 5 10 60 --rounds 2

After one uncounted warm-up run, alternates, ``--rounds`` times: the largest threshold alone, then every threshold in one run
(fresh output directories each time, deleted afterwards). Reports wall and CPU time of each
pipeline() call (in-process default run: one worker thread in this process, so this process's
CPU time is the run's) and the ratio several/alone. On a shared machine the CPU ratio is the
steadier figure; the best of the rounds is reported too.

``--command``: each round also times the same two builds as a user runs them, the command line
(``python -m hats_margin build CATALOG OUT --threshold 60`` and ``... --threshold 5 --threshold 10
--threshold 60``) as a fresh process, start to exit, wall and CPU (the child's user + system).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from hats_margin import MarginCacheArguments, pipeline
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hats_margin import MarginCacheArguments, pipeline


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(catalog: Path, thresholds: list[float], workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    args = MarginCacheArguments(
        input_catalog_path=str(catalog), output_path=str(out), output_artifact_name="m",
        margin_threshold=thresholds if len(thresholds) > 1 else thresholds[0], progress_bar=False,
    )
    cpu, wall = _cpu(), time.perf_counter()
    result = pipeline(args)
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    margins = getattr(result, "margins", [result])
    shutil.rmtree(out)
    return {
        "thresholds": thresholds,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "rows": [m.total_rows for m in margins],
        "stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
    }


def _command(catalog: Path, thresholds: list[float], workdir: Path) -> dict:
    """The build as a user runs it: the command line in a fresh process, start to exit."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    argv = [sys.executable, "-m", "hats_margin", "build", str(catalog), str(out), "--name", "m", "--no-progress"]
    for threshold in thresholds:
        argv += ["--threshold", f"{threshold:g}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"thresholds": thresholds, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("catalog", type=Path)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5, 10, 60], help="arcsec")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: beside the catalog)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--separate", action="store_true",
                        help="each round also times one build per smaller threshold (the cost without one read)")
    parser.add_argument("--command", action="store_true",
                        help="each round also times both builds as the command line, start to exit")
    opts = parser.parse_args(argv)
    workdir = opts.workdir or opts.catalog.parent
    largest = [max(opts.thresholds)]
    _run(opts.catalog, largest, workdir)  # warm-up: imports and file cache, not counted
    rounds = []
    for _ in range(opts.rounds):
        alone = _run(opts.catalog, largest, workdir)
        several = _run(opts.catalog, opts.thresholds, workdir)
        rounds.append({"alone": alone, "several": several})
        if opts.command:
            rounds[-1]["command_alone"] = _command(opts.catalog, largest, workdir)
            rounds[-1]["command_several"] = _command(opts.catalog, opts.thresholds, workdir)
        if opts.separate:
            others = [_run(opts.catalog, [t], workdir) for t in opts.thresholds if t != largest[0]]
            rounds[-1]["separate_total"] = {
                key: round(alone[key] + sum(o[key] for o in others), 2) for key in ("wall_seconds", "cpu_seconds")
            }
        print(json.dumps(rounds[-1]), flush=True)
    best = {k: min(r[k]["wall_seconds"] for r in rounds) for k in ("alone", "several")}
    best_cpu = {k: min(r[k]["cpu_seconds"] for r in rounds) for k in ("alone", "several")}
    summary = {
        "catalog": str(opts.catalog),
        "rounds": rounds,
        "best_wall_ratio": round(best["several"] / best["alone"], 3),
        "best_cpu_ratio": round(best_cpu["several"] / best_cpu["alone"], 3),
        "per_round_wall_ratio": [round(r["several"]["wall_seconds"] / r["alone"]["wall_seconds"], 3) for r in rounds],
        "per_round_cpu_ratio": [round(r["several"]["cpu_seconds"] / r["alone"]["cpu_seconds"], 3) for r in rounds],
    }
    if opts.command:
        for key in ("wall_seconds", "cpu_seconds"):
            summary[f"command_per_round_{key.split('_')[0]}_ratio"] = [
                round(r["command_several"][key] / r["command_alone"][key], 3) for r in rounds
            ]
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    if opts.out:
        opts.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

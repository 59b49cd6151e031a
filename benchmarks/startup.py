"""Fixed cost of the command line: the whole ``hats-margin demo``, and the first errors a user meets.

Each measurement is a fresh subprocess timed from start to exit (Python start-up and imports
included), after one warm-up run so that the file cache is warm; the median of ``--runs``
runs is printed, with the median CPU time (user + system, children included). Measured:

- ``demo``: ``hats-margin demo OUT --no-progress`` (the bundled sample, 10 arcsec margin);
- ``bad input``: ``hats-margin build <missing directory> OUT`` (exit code 2);
- ``existing output``: ``hats-margin build <sample> OUT --name <the demo's margin>`` (exit code 2).

``--src DIR`` measures another checkout (its ``src`` directory is put first on PYTHONPATH), e.g.
the main branch exported with ``git archive main | tar -x -C /tmp/main``::

    python benchmarks/startup.py --runs 5
    python benchmarks/startup.py --runs 5 --src /tmp/main/src
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_NAME = "small_sky_source_catalog_10arcs"


def timed(argv: list[str], env: dict, expect: int) -> tuple[float, float]:
    """(wall seconds from process start to exit, CPU seconds of the process and its children);
    the exit code must be ``expect``. CPU time is the steadier figure on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} exited {run.returncode}, expected {expect}:\n{run.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median printed)")
    parser.add_argument("--src", help="a checkout's src directory to measure instead of the installed package")
    opts = parser.parse_args(argv)

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if opts.src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(opts.src).resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "hats_margin"]
    sample = subprocess.run(
        [sys.executable, "-c", "from hats_margin.cli import sample_catalog; print(sample_catalog())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    with tempfile.TemporaryDirectory(prefix="hats-margin-startup-") as tmp:
        out = Path(tmp) / "out"
        cases = {
            "demo (whole command)": ([*command, "demo", str(out), "--no-progress"], 0),
            "bad input error": ([*command, "build", str(Path(tmp) / "missing"), str(out), "--no-progress"], 2),
            "existing output error": (
                [*command, "build", sample, str(out), "--name", DEMO_NAME, "--threshold", "10", "--no-progress"], 2,
            ),
        }
        figures = {}
        for label, (case_argv, expect) in cases.items():
            timed(case_argv, env, expect)  # warm-up (and, for the demo, the output the next case needs)
            figures[label] = [timed(case_argv, env, expect) for _ in range(opts.runs)]

    print(f"hats-margin start-up, {opts.runs} runs each after a warm-up, load average before: {load:.2f}")
    print(f"package: {opts.src or 'installed'}; python: {sys.executable}")
    print(f"{'case':<24}{'median wall s':>14}{'min s':>8}{'max s':>8}{'median CPU s':>14}")
    for label, values in figures.items():
        wall, cpu = [v[0] for v in values], [v[1] for v in values]
        print(f"{label:<24}{statistics.median(wall):>14.2f}{min(wall):>8.2f}{max(wall):>8.2f}"
              f"{statistics.median(cpu):>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

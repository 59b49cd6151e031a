"""Time the exact filter of the map stage in-process, without Dask, against the rest of mapping.

    python benchmarks/exact_filter_cost.py ../bench-data/sky_1m --thresholds 1,10,60,3600 --repeats 3

For every source partition and row group: read the spatial index, find candidate pairs
(the coarse search of exact mode), read ra/dec and run the exact filter. Prints, per threshold,
the medians over repeats of the candidate search and of the exact filter (seconds), the candidate
and kept pair counts, and the filter's share. Wrap it in pyinstrument or py-spy to profile:

    pyinstrument benchmarks/exact_filter_cost.py ../bench-data/sky_1m --thresholds 3600 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from hats_margin import MarginCacheArguments
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hats_margin import MarginCacheArguments

import numpy as np

from hats_margin import exact_filter, geometry
from hats_margin.io import leaf_files, open_parquet, read_row_group
from hats_margin.stages import planning


def measure(catalog: str, threshold: float, out: str) -> dict:
    """One pass over every partition; seconds in the search and in the exact filter."""
    args = MarginCacheArguments(
        input_catalog_path=catalog,
        output_path=out,
        output_artifact_name=f"cost_{threshold:g}",
        margin_threshold=threshold,
        progress_bar=False,
    )
    plan = planning.make_plan(args)
    search = exact = 0.0
    candidates = kept = 0
    for task in plan.map_tasks:
        dests = geometry.Tiling.from_pixels(task.dest_orders, task.dest_pixels)
        if len(dests) == 0:
            continue
        for path in leaf_files(task.leaf, task.input_suffix):
            parquet = open_parquet(path)
            for group in range(parquet.num_row_groups):
                start = time.perf_counter()
                index = read_row_group(parquet, path, group, [task.healpix_column]).column(0)
                spatial_index = index.to_numpy().astype(np.int64, copy=False)
                rows, dest_idx = geometry.candidate_pairs(
                    spatial_index, task.healpix_order, *task.source, task.search_order, task.rings, dests
                )
                middle = time.perf_counter()
                if len(rows):
                    radec = read_row_group(parquet, path, group, [task.ra_column, task.dec_column])
                    ra, dec = (np.asarray(c.to_numpy(), dtype=np.float64) for c in radec.columns)
                    keep = exact_filter.pairs_within_threshold(
                        ra, dec, spatial_index, task.healpix_order, max(task.search_order, task.source[0]),
                        rows, dest_idx, dests, task.threshold_arcsec,
                    )
                    kept += int(keep.sum())
                candidates += len(rows)
                end = time.perf_counter()
                search += middle - start
                exact += end - middle
    return {"search": search, "exact": exact, "candidates": candidates, "kept": kept}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog")
    parser.add_argument("--thresholds", default="1,10,60,3600", help="arcsec, comma separated")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        for threshold in (float(t) for t in options.thresholds.split(",")):
            runs = [measure(options.catalog, threshold, out) for _ in range(options.repeats)]
            search = statistics.median(r["search"] for r in runs)
            exact = statistics.median(r["exact"] for r in runs)
            all_runs = ", ".join(f"{r['exact']:.2f}" for r in runs)
            print(
                f'{threshold:>7g}": search {search:6.2f} s  exact filter {exact:6.2f} s  '
                f"candidates {runs[0]['candidates']:>8,}  kept {runs[0]['kept']:>8,}  "
                f"(all runs: {all_runs})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

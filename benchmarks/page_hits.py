"""How much of a catalog a page-level reader could skip: the share of data pages holding a margin row.

    python benchmarks/page_hits.py ../bench-data/wide_5m --threshold 10

A margin needs every row's spatial index, but its other columns only for the rows it keeps. pyarrow
decodes whole row groups (it has no row-range read), so the map stage decodes every row group that
holds a margin row. A reader that decoded single pages would still decode each page holding one.
This script runs the map stage's own selection (candidate search and exact test, in-process, no
output) and counts, for pages of the sizes given (rows per page: 128 KB pages hold 16,384 float64
or 32,768 float32 values), the share of pages that hold at least one margin row, and the share of
row groups. Pages are taken as equal row ranges of each row group (the writer cuts them by size,
so this is an estimate for fixed-width columns).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hats_margin import MarginCacheArguments, geometry
from hats_margin.exact_filter import pairs_within_thresholds
from hats_margin.io import leaf_files, open_parquet, read_row_group
from hats_margin.stages import planning


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("catalog")
    parser.add_argument("--threshold", type=float, default=10.0)
    parser.add_argument("--page-rows", type=int, nargs="+", default=[4096, 16384, 32768])
    opts = parser.parse_args(argv)
    args = MarginCacheArguments(input_catalog_path=opts.catalog, output_path="/nonexistent-output",
                                output_artifact_name="m", margin_threshold=opts.threshold, progress_bar=False)
    plan = planning.make_plan(args)
    groups = groups_hit = rows_total = rows_kept = 0
    pages = dict.fromkeys(opts.page_rows, 0)
    hit = dict.fromkeys(opts.page_rows, 0)
    for task in plan.map_tasks:
        dests = geometry.Tiling.from_pixels(task.dest_orders, task.dest_pixels)
        for path in leaf_files(task.leaf, task.input_suffix):
            parquet = open_parquet(path)
            for group in range(parquet.num_row_groups):
                cols = read_row_group(parquet, path, group, [task.healpix_column, task.ra_column, task.dec_column])
                index = cols.column(0).to_numpy().astype(np.int64)
                ra, dec = (np.asarray(cols.column(i).to_numpy(), dtype=np.float64) for i in (1, 2))
                rows, dest_idx = geometry.candidate_pairs(index, task.healpix_order, *task.source,
                                                          task.search_order, task.rings, dests)
                if len(rows):
                    (keep,) = pairs_within_thresholds(ra, dec, index, task.healpix_order,
                                                      max(task.search_order, task.source[0]), rows, dest_idx,
                                                      dests, (task.threshold_arcsec,))
                    rows = rows[keep]
                kept = np.unique(rows)
                n = len(index)
                groups += 1
                groups_hit += bool(len(kept))
                rows_total += n
                rows_kept += len(kept)
                for size in opts.page_rows:
                    pages[size] += -(-n // size)
                    hit[size] += len(np.unique(kept // size))
    print(f"{opts.catalog}, {opts.threshold:g} arcsec: {rows_kept:,} margin rows of {rows_total:,} "
          f"({len(plan.map_tasks)} partitions)")
    print(f"row groups holding a margin row: {groups_hit} of {groups} ({100 * groups_hit / max(groups, 1):.0f}%)")
    for size in opts.page_rows:
        print(f"pages of {size:,} rows holding a margin row: {hit[size]:,} of {pages[size]:,} "
              f"({100 * hit[size] / max(pages[size], 1):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A catalog with one huge partition, for the memory target of the benchmarks.

    python benchmarks/generate_big_partition.py ../bench-data/big_partition --rows 6000000

All rows fall inside base pixel 4, so the catalog is a single order-0 partition of ``--rows``
rows written in row groups of 100,000 rows (a map task that read the partition whole would need
gigabytes; one that streams row groups needs a few tens of MB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cdshealpix.nested as cds
import numpy as np
import pyarrow as pa

try:
    from hats_margin.testing import synthetic
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hats_margin.testing import synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--row-group-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    index = rng.integers(4 << 58, 5 << 58, size=args.rows, dtype=np.int64).astype(np.uint64)
    lon, lat = cds.healpix_to_lonlat(index, 29)
    table = synthetic.realistic_sky(args.rows, seed=args.seed + 1)
    table = table.set_column(table.schema.get_field_index("ra"), "ra", pa.array(lon.to_value("deg")))
    table = table.set_column(table.schema.get_field_index("dec"), "dec", pa.array(lat.to_value("deg")))
    start = time.perf_counter()
    synthetic.write_hats_catalog(
        table, args.out_dir, catalog_name=args.out_dir.name, max_rows_per_partition=args.rows + 1,
        row_group_size=args.row_group_size, overwrite=True, write_table_kwargs={"compression_level": 3},
    )
    print(f"wrote {args.rows} rows in one partition to {args.out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""Time planning for ~50,000 partitions at margin order 14 (no files are read or written).

    python benchmarks/plan_50k_partitions.py

Builds the planner's view of a catalog of 49,200 partitions (order-6 pixels, 16 of them split
to order 7) and times make_map_tasks in exact and coarse mode: the target is under 2 s, with
every map task carrying only its few reachable destinations.
"""

import time

import numpy as np
import pyarrow as pa
from hats.catalog import TableProperties
from upath import UPath

from hats_margin import MarginCacheArguments, geometry
from hats_margin.io import TempLayout
from hats_margin.stages import planning

# 49,152 order-6 partitions + a hole (so there is a negative tree), margin order 14
parts = [(6, p) for p in range(12 * 4**6) if not (1000 <= p < 1016)] + [(7, p) for p in range(4000, 4064)]
t0 = time.perf_counter()
o, p = geometry.negative_tree([a for a, _ in parts], [b for _, b in parts])
neg = tuple(zip(o.tolist(), p.tolist()))
props = TableProperties(catalog_name="x", catalog_type="object", ra_column="ra", dec_column="dec", total_rows=1)
cat = planning.InputCatalog(UPath("/tmp/x"), props, pa.schema([("_healpix_29", pa.int64()), ("ra", pa.float64()), ("dec", pa.float64())]),
                            tuple(parts), neg, "_healpix_29", 29, ".parquet")
for fine in (True, False):
    args = MarginCacheArguments(input_catalog_path="/tmp/x", output_path="/tmp/y", output_artifact_name="z", margin_threshold=5.0, margin_order=14, fine_filtering=fine)
    t = time.perf_counter()
    plan = planning.Plan(args=args, catalog=cat, margin_order=14, threshold_arcsec=5.0, layout=TempLayout(UPath("/tmp/y/z/intermediate")), fingerprint={})
    tasks = planning.make_map_tasks(plan)
    dt = time.perf_counter() - t
    sizes = [len(tk.dest_orders) for tk in tasks]
    print(f"fine={fine}: {len(parts)} partitions, {len(neg)} negative pixels -> {len(tasks)} map tasks in {dt:.2f} s "
          f"(negative tree {time.perf_counter()-t0-dt:.2f} s); destinations per task max {max(sizes)}, mean {np.mean(sizes):.1f}")
    t0 = time.perf_counter()

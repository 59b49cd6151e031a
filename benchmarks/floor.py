"""The I/O floor of a margin build: read every input partition once, write N rows.

    python benchmarks/floor.py CATALOG --write-rows N --workers W --out-dir DIR

No margin can be built faster than reading every partition once (all columns, row group by
row group) and writing the margin's rows with the same parquet settings (hats'
``get_parquet_write_table_kwargs``: zstd level 15, byte-stream-split floats, 100k-row row
groups). ``W`` threads read partitions concurrently and then write ``W`` files of about
``N / W`` rows each (taken from the rows read, repeated if ``N`` exceeds the input).

Prints one line ``BENCH_JSON {...}`` with ``read_seconds``, ``write_seconds`` and
``floor_seconds`` (their sum), plus rows and bytes read and written.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hats.io.file_io import get_parquet_write_table_kwargs


def _read_properties(catalog: Path) -> dict[str, str]:
    properties = {}
    for line in (catalog / "hats.properties").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def partition_files(catalog: Path) -> list[Path]:
    """Every data file of the catalog's partitions, in partition_info.csv order."""
    suffix = _read_properties(catalog).get("hats_npix_suffix", ".parquet")
    files = []
    for line in (catalog / "partition_info.csv").read_text().split()[1:]:
        order, pixel = (int(value) for value in line.split(","))
        leaf = catalog / "dataset" / f"Norder={order}" / f"Dir={(pixel // 10_000) * 10_000}" / f"Npix={pixel}"
        if suffix in ("/", "\\"):
            files.extend(sorted(f for f in leaf.iterdir() if not f.name.startswith(("_", "."))))
        else:
            files.append(leaf.with_name(leaf.name + suffix))
    return files


class _Budget:
    """How many more rows the readers should keep for writing (shared by the reader threads)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self.lock:
            granted = min(wanted, self.rows)
            self.rows -= granted
            return granted


def _read_file(path: Path, budget: _Budget) -> tuple[int, int, list[pa.Table]]:
    """Read all row groups of ``path``; return (rows, bytes on disk, rows kept for writing)."""
    parquet = pq.ParquetFile(path)
    rows, kept = 0, []
    for index in range(parquet.num_row_groups):
        group = parquet.read_row_group(index)
        rows += group.num_rows
        keep = budget.take(group.num_rows)
        if keep:
            kept.append(group.slice(0, keep))
    return rows, path.stat().st_size, kept


def run_floor(catalog: Path, write_rows: int, workers: int, out_dir: Path) -> dict:
    files = partition_files(catalog)
    schema = pq.read_schema(catalog / "dataset" / "_common_metadata")
    out_dir.mkdir(parents=True, exist_ok=True)

    cpu_start = time.process_time()
    start = time.perf_counter()
    budget = _Budget(write_rows)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda f: _read_file(f, budget), files))
    read_seconds = time.perf_counter() - start
    rows_read = sum(r[0] for r in results)
    bytes_read = sum(r[1] for r in results)

    start = time.perf_counter()
    kept = [table for r in results for table in r[2]]
    pool_rows = pa.concat_tables(kept, promote_options="none").cast(schema) if kept else schema.empty_table()
    if pool_rows.num_rows and write_rows > pool_rows.num_rows:
        repeats = -(-write_rows // pool_rows.num_rows)
        pool_rows = pa.concat_tables([pool_rows] * repeats)
    to_write = pool_rows.slice(0, write_rows)
    kwargs = get_parquet_write_table_kwargs(schema)
    row_group_size = kwargs.pop("row_group_size")
    n_files = max(1, min(workers, to_write.num_rows))
    bounds = [to_write.num_rows * i // n_files for i in range(n_files + 1)]

    def write(i: int) -> int:
        target = out_dir / f"floor_{i}.parquet"
        pq.write_table(
            to_write.slice(bounds[i], bounds[i + 1] - bounds[i]),
            target,
            row_group_size=row_group_size,
            **kwargs,
        )
        return target.stat().st_size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        bytes_written = sum(pool.map(write, range(n_files)))
    write_seconds = time.perf_counter() - start
    return {
        "files_read": len(files),
        "rows_read": rows_read,
        "bytes_read": bytes_read,
        "rows_written": to_write.num_rows,
        "bytes_written": bytes_written,
        "files_written": n_files,
        "read_seconds": read_seconds,
        "write_seconds": write_seconds,
        "floor_seconds": read_seconds + write_seconds,
        "in_pipeline_cpu_seconds": time.process_time() - cpu_start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("catalog", type=Path)
    parser.add_argument("--write-rows", type=int, required=True, help="rows to write (the margin's size)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run_floor(args.catalog, args.write_rows, args.workers, args.out_dir)
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

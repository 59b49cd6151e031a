"""What one margin file costs on a disk, apart from the pipeline's own work.

    python benchmarks/file_cost.py CATALOG --out-dir DIR [--files 500] [--rows 30]

A HATS margin is one parquet file per margin pixel, so a build pays, per pixel, what the file
system charges to create a file and what pyarrow charges to encode one, whatever the tool. This
measures both in ``DIR`` (put it where the benchmark writes its outputs), one after the other:

* ``create``: ``--files`` empty files created and closed in one directory;
* ``encode``: ``--files`` parquet files of ``--rows`` rows (the first rows of the catalog's first
  partition) encoded in memory with the settings margin files are written with
  (``io.margin_write_kwargs``);
* ``publish``: the same files written as the reduce stage writes a small one: encoded, written
  under a temporary name, renamed.

Prints one ``BENCH_JSON {...}`` line: milliseconds per file, wall and CPU (user, system) of each.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

try:
    from hats_margin.io import MarginFileWriter, margin_write_kwargs, publish
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hats_margin.io import MarginFileWriter, margin_write_kwargs, publish


def _usage() -> tuple[float, float, float]:
    """(wall, user, system) seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime, usage.ru_stime


def _per_file(start, files: int) -> dict:
    """Milliseconds per file since ``start`` (a ``_usage()``): wall, user, system."""
    end = _usage()
    wall, user, system = (1000 * (b - a) / files for a, b in zip(start, end))
    return {"wall_ms": round(wall, 3), "user_ms": round(user, 3), "system_ms": round(system, 3)}


def first_rows(catalog: Path, rows: int) -> pa.Table:
    """The first ``rows`` rows of the catalog's first partition file."""
    first = min((catalog / "dataset").glob("**/*.parquet"), key=str)
    return pq.ParquetFile(first).read_row_group(0).slice(0, rows)


def measure(catalog: Path, out_dir: Path, files: int, rows: int) -> dict:
    """Per-file costs of creating, encoding and publishing ``files`` files of ``rows`` rows in ``out_dir``."""
    table = first_rows(catalog, rows)
    index_column = next((n for n in table.column_names if n in ("_healpix_29", "_hipscat_index")), table.column_names[0])
    kwargs = margin_write_kwargs(table.schema, index_column, None)
    encode_kwargs = {k: v for k, v in kwargs.items() if k != "row_group_size"}
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix="file_cost_"))
    try:
        (work / "create").mkdir()
        start = _usage()
        for i in range(files):
            with open(work / "create" / f"f{i}", "wb"):
                pass
        create = _per_file(start, files)

        start = _usage()
        for _ in range(files):
            sink = pa.BufferOutputStream()
            with pq.ParquetWriter(sink, table.schema, **encode_kwargs) as writer:
                writer.write_table(table)
        encode = _per_file(start, files)

        (work / "publish").mkdir()
        start = _usage()
        for i in range(files):
            final = UPath(work / "publish" / f"Npix={i}.parquet")
            temporary = final.with_name(f".{final.name}.tmp")
            writer = MarginFileWriter(temporary, table.schema, kwargs)
            writer.write(table)
            writer.close()
            publish(temporary, final)
        published = _per_file(start, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "out_dir": str(out_dir), "files": files, "rows_per_file": table.num_rows, "columns": table.num_columns,
        "create": create, "encode": encode, "publish": published,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("catalog", type=Path)
    parser.add_argument("--out-dir", type=Path, required=True, help="where the files are made (then removed)")
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--rows", type=int, default=30)
    opts = parser.parse_args(argv)
    if opts.files < 1 or opts.rows < 1:
        parser.error(f"--files and --rows must be at least 1 (got {opts.files}, {opts.rows})")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    print("BENCH_JSON " + json.dumps(measure(opts.catalog, opts.out_dir, opts.files, opts.rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark catalogs of the shapes astronomers margin (deterministic, seeded).

    python benchmarks/generate_shapes.py wide   ../bench-data/wide_5m   [--rows 5000000]
    python benchmarks/generate_shapes.py many   ../bench-data/many_17k  [--rows 1200000]
    python benchmarks/generate_shapes.py nested ../bench-data/nested    [--rows 500000]

* ``wide``: 110 Gaia-like columns (float32/float64/int8-64/bool/string, some with nulls),
  partitions of 300k-1M rows (all-sky with a denser galactic band, split at 1M rows), row groups
  of 100k rows as hats writes them (``get_parquet_write_table_kwargs``).
* ``many``: >= 10,000 small partitions: all-sky, a galactic band and gaussian clusters
  (``hats_margin.testing.synthetic.realistic_sky``, 13 columns), split at 200 rows (16,728 partitions).
* ``nested``: a ``list<struct<mjd, mag, mag_err, band, flags>>`` light curve of 20-60 epochs per
  object beside 10 flat columns, partitions of <= 50k objects.

Positions are drawn for every row first (a few arrays), then each partition's other columns
are drawn from a generator seeded by ``(seed, order, pixel)`` and written at once: memory is
bounded by one partition whatever ``--rows``, and a catalog is the same on every machine.
Keep the output outside the repository (the default ``../bench-data/`` is beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

try:
    from hats_margin.testing import synthetic
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from hats_margin.testing import synthetic

from hats.catalog import PartitionInfo, TableProperties
from hats.io.file_io import get_parquet_write_table_kwargs
from hats.pixel_math import HealpixPixel

ROW_GROUP_SIZE = 100_000  # hats' get_parquet_write_table_kwargs default


# ------------------------------------------------------------------------------------ positions
def sky_positions(rows: int, seed: int, band_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """All-sky uniform background plus a denser galactic band (deterministic)."""
    rng = np.random.default_rng([seed, 1])
    n_band = int(rows * band_fraction)
    ra_u, dec_u = synthetic._uniform_sphere(rng, rows - n_band)
    ra_b, dec_b = synthetic._galactic_band(rng, n_band)
    return np.concatenate([ra_u, ra_b]), np.concatenate([dec_u, dec_b])


# -------------------------------------------------------------------------------------- columns
def _with_nulls(rng, array: pa.Array, fraction: float) -> pa.Array:
    if not fraction:
        return array
    mask = rng.random(len(array)) < fraction
    return pa.array(array.to_numpy(zero_copy_only=False), type=array.type, mask=mask)


def wide_columns(rng: np.random.Generator, n: int, first_id: int) -> dict[str, pa.Array]:
    """107 columns shaped like Gaia DR3's gaia_source (plus _healpix_29, ra, dec = 110)."""
    cols: dict[str, pa.Array] = {
        "source_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "solution_id": pa.array(np.full(n, 375316653866487564, dtype=np.int64)),
        "designation": pa.array([f"Gaia DR3 {first_id + i}" for i in range(n)]),
        "random_index": pa.array(rng.integers(0, 1 << 31, n, dtype=np.int64)),
        "phot_variable_flag": pa.array(np.where(rng.random(n) < 0.05, "VARIABLE", "NOT_AVAILABLE")),
        "libname_gspphot": _with_nulls(rng, pa.array(rng.choice(["MARCS", "PHOENIX", "A", "OB"], n)), 0.3),
    }
    float64_names = ["ra_error", "dec_error", "parallax", "pmra", "pmdec", "l", "b", "ecl_lon", "ecl_lat",
                     "ra_dec_corr", "ra_parallax_corr", "dec_parallax_corr", "parallax_pmra_corr",
                     "parallax_pmdec_corr", "pmra_pmdec_corr", "phot_g_mean_flux", "phot_bp_mean_flux",
                     "phot_rp_mean_flux", "phot_g_mean_flux_error", "phot_bp_mean_flux_error",
                     "phot_rp_mean_flux_error", "radial_velocity", "radial_velocity_error", "nu_eff_used_in_astrometry",
                     "pseudocolour", "astrometric_excess_noise", "astrometric_excess_noise_sig", "ruwe",
                     "teff_gspphot", "logg_gspphot", "mh_gspphot", "distance_gspphot", "azero_gspphot"]
    for i, name in enumerate(float64_names):
        cols[name] = _with_nulls(rng, pa.array(rng.normal(size=n)), 0.2 if i % 3 == 2 else 0.0)
    for i in range(34):
        name = f"phot_{['g', 'bp', 'rp'][i % 3]}_stat_{i:02d}"
        cols[name] = _with_nulls(rng, pa.array(rng.normal(15, 2, n).astype(np.float32)), 0.1 if i % 4 == 0 else 0.0)
    for i, dtype in enumerate([np.int8] * 6 + [np.int16] * 8 + [np.int32] * 8 + [np.int64] * 4):
        info = np.iinfo(dtype)
        high = min(int(info.max), 100_000)
        values = rng.integers(0, high, n, dtype=dtype)
        cols[f"n_{np.dtype(dtype).name}_{i:02d}"] = _with_nulls(rng, pa.array(values), 0.05 if i % 5 == 0 else 0.0)
    for i in range(8):
        cols[f"flag_{i}"] = pa.array(rng.random(n) < 0.1 * (i + 1))
    return cols


def nested_columns(rng: np.random.Generator, n: int, first_id: int) -> dict[str, pa.Array]:
    """10 flat columns and a list<struct> light curve of 20-60 epochs per object."""
    cols: dict[str, pa.Array] = {"object_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64))}
    for i in range(4):
        cols[f"mean_mag_{'ugri'[i]}"] = pa.array(rng.normal(19, 1.5, n).astype(np.float32))
    for i in range(3):
        cols[f"stat_{i}"] = pa.array(rng.normal(size=n))
    cols["n_epochs"] = pa.array(rng.integers(20, 61, n, dtype=np.int16))
    cols["is_variable"] = pa.array(rng.random(n) < 0.1)
    counts = cols["n_epochs"].to_numpy().astype(np.int64)
    total = int(counts.sum())
    epochs = pa.StructArray.from_arrays(
        [
            pa.array(60000 + rng.random(total) * 3000),
            pa.array(rng.normal(19, 1.5, total).astype(np.float32)),
            pa.array(rng.gamma(2, 0.02, total).astype(np.float32)),
            pa.array(rng.choice(np.array(["u", "g", "r", "i", "z", "y"]), total)),
            pa.array(rng.integers(0, 256, total, dtype=np.int32)),
        ],
        names=["mjd", "mag", "mag_err", "band", "flags"],
    )
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    cols["lightcurve"] = pa.ListArray.from_arrays(pa.array(offsets), epochs)
    return cols


SHAPES = {
    "wide": {"columns": wide_columns, "rows": 5_000_000, "max_rows": 1_000_000, "lowest_order": 0},
    "nested": {"columns": nested_columns, "rows": 500_000, "max_rows": 50_000, "lowest_order": 0},
}


# -------------------------------------------------------------------------------------- writing
def write_shape(shape: str, out: Path, rows: int, seed: int, max_rows: int, lowest_order: int = 0,
                compression_level: int = 3, threads: int = 2) -> dict:
    """Partition positions drawn for ``rows`` rows and write each partition's columns at once."""
    start = time.perf_counter()
    make_columns = SHAPES[shape]["columns"]
    ra, dec = sky_positions(rows, seed)
    index = synthetic.spatial_index(ra, dec)
    order = np.argsort(index, kind="stable")
    ra, dec, index = ra[order], dec[order], index[order]
    del order
    orders, pixels, starts, stops = synthetic._adaptive_partitions(index, max_rows, lowest_order, 10)
    ranking = synthetic._breadth_first(orders, pixels)
    orders, pixels, starts, stops = orders[ranking], pixels[ranking], starts[ranking], stops[ranking]
    if out.exists():
        shutil.rmtree(out)
    dataset = out / "dataset"
    dataset.mkdir(parents=True)

    def table_of(i: int) -> pa.Table:
        lo, hi = int(starts[i]), int(stops[i])
        rng = np.random.default_rng([seed, int(orders[i]), int(pixels[i])])
        columns = {"_healpix_29": pa.array(index[lo:hi]), "ra": pa.array(ra[lo:hi]), "dec": pa.array(dec[lo:hi])}
        columns.update(make_columns(rng, hi - lo, lo))
        return pa.table(columns)

    schema = table_of(0).slice(0, 0).schema
    kwargs = get_parquet_write_table_kwargs(
        schema,
        write_table_kwargs={"compression": "zstd", "compression_level": compression_level,
                            "sorting_columns": [pq.SortingColumn(0)]},
    )
    row_group_size = kwargs.pop("row_group_size", ROW_GROUP_SIZE)

    def write_one(i: int) -> pq.FileMetaData:
        relative = synthetic._relative_file(int(orders[i]), int(pixels[i]), ".parquet")
        target = dataset / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        collector: list[pq.FileMetaData] = []
        with pq.ParquetWriter(target, schema, metadata_collector=collector, **kwargs) as writer:
            writer.write_table(table_of(i), row_group_size=row_group_size)
        collector[0].set_file_path(relative)
        return collector[0]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        footers = list(pool.map(write_one, range(len(pixels))))
    pq.write_metadata(schema, dataset / "_common_metadata")
    pq.write_metadata(schema, dataset / "_metadata", metadata_collector=footers)
    healpix = [HealpixPixel(int(k), int(p)) for k, p in zip(orders, pixels)]
    partition_info = PartitionInfo.from_healpix(healpix)
    partition_info.write_to_file(catalog_path=out)
    info = {
        "catalog_name": out.name, "catalog_type": "object", "total_rows": int(rows), "ra_column": "ra",
        "dec_column": "dec", "healpix_column": "_healpix_29", "healpix_order": 29, "npix_suffix": ".parquet",
        "hats_max_rows": int(max_rows), "hats_order": int(orders.max()),
        "moc_sky_fraction": f"{partition_info.calculate_fractional_coverage():0.5f}",
    }
    TableProperties(**TableProperties.new_provenance_dict(out, builder="hats-margin benchmarks", **info)
                    ).to_properties_file(out)
    sizes = stops - starts
    largest = int(np.argmax(sizes))
    return {
        "path": str(out), "shape": shape, "rows": rows, "seed": seed, "columns": len(schema),
        "partitions": len(pixels), "rows_per_partition": [int(sizes.min()), int(sizes.max())],
        "largest_row_group_decoded_bytes": int(table_of(largest).slice(0, row_group_size).nbytes),
        "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["wide", "many", "nested"])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="default: the shape's (wide 5 M, many 1.2 M, "
                        "nested 500 k)")
    parser.add_argument("--max-rows-per-partition", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression-level", type=int, default=3, help="zstd level (hats: 15; 3 writes faster)")
    args = parser.parse_args(argv)
    if args.shape == "many":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from generate_catalog import generate

        summary = generate(
            args.out_dir, rows=args.rows or 1_200_000, max_rows_per_partition=args.max_rows_per_partition or 200,
            seed=args.seed, compression_level=args.compression_level, overwrite=True,
        )
    else:
        preset = SHAPES[args.shape]
        summary = write_shape(
            args.shape, args.out_dir, args.rows or preset["rows"], args.seed,
            args.max_rows_per_partition or preset["max_rows"], preset["lowest_order"], args.compression_level,
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

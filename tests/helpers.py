"""Small helpers for comparing margin catalogs in tests."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def pixel_files(catalog: Path) -> dict[tuple[int, int], list[Path]]:
    """(order, pixel) -> parquet files, for both leaf layouts."""
    result: dict[tuple[int, int], list[Path]] = {}
    for path in sorted(Path(catalog, "dataset").glob("Norder=*/Dir=*/Npix=*")):
        order = int(path.parts[-3].split("=")[1])
        pixel = int(path.name.split("=")[1].split(".")[0])
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        result[(order, pixel)] = files
    return result


def sorted_rows(table: pa.Table) -> list[tuple]:
    """Rows as tuples, sorted: an order-insensitive multiset comparison key."""
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return sorted(zip(*columns), key=repr)


def rows_per_pixel(catalog: Path) -> dict[tuple[int, int], list[tuple]]:
    out = {}
    for pixel, files in pixel_files(catalog).items():
        table = pa.concat_tables([pq.read_table(f) for f in files])
        out[pixel] = sorted_rows(table)
    return out


def tree_checksum(root: Path) -> str:
    """Hash of every file's relative path and bytes under root (is an input untouched?)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def moto_s3(server_class=None):
    """A moto S3 server on loopback (any free port) for the duration of the block; yields the
    storage options (endpoint, key, secret) that reach it."""
    import moto.server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = (server_class or moto_server.ThreadedMotoServer)(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()

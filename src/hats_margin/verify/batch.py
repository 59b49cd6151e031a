"""One batch of destination pixels: read their margin rows, scan every primary partition that
can reach them (the search), and compare. Runs in-process or as one Dask task."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hats_margin.errors import InputCatalogError
from hats_margin.io import arrow_of, numpy_of
from hats_margin.verify.catalogs import conform, read_parquet
from hats_margin.verify.compare import Recorder
from hats_margin.verify.hashing import row_hashes
from hats_margin.verify.report import VerifyReport
from hats_margin.verify.search import candidates, cap_test, decide, sources_reaching
from hats_margin.verify.tiles import ranks


class Keys:
    """Columns of row keys gathered for one batch: tile, spidx, hash and named extras."""

    def __init__(self, **extra_dtypes):
        """Empty columns: tile, spidx and hash, plus ``extra_dtypes`` (name -> numpy dtype)."""
        self.dtypes = {"tile": np.int64, "spidx": np.int64, "hash": np.uint64, **extra_dtypes}
        self.parts: dict[str, list] = {key: [] for key in self.dtypes}

    def add(self, tile, spidx, hashes, **extra):
        """Append one chunk of rows (every column the same length)."""
        for key, value in {"tile": tile, "spidx": spidx, "hash": hashes, **extra}.items():
            self.parts[key].append(np.asarray(value, dtype=self.dtypes[key]))

    def arrays(self) -> dict[str, np.ndarray]:
        """Each column as one numpy array (empty arrays of the right dtype if nothing was added)."""
        return {
            key: np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtypes[key])
            for key, parts in self.parts.items()
        }


class BatchCheck:
    """Checks one batch of destination tiles against the primary; fills a partial report."""

    def __init__(self, ctx):
        """A checker for ``ctx`` (a ``checker.Context``) with an empty partial report."""
        self.ctx = ctx
        self.tiles, self.primary, self.margin = ctx.tiles, ctx.primary, ctx.margin
        self.shift_index = ctx.shift_index
        self.report = VerifyReport(str(ctx.margin.path), str(ctx.primary.path), ctx.threshold, ctx.exact)

    def run(self, batch: np.ndarray) -> VerifyReport:
        """Compare the destination tiles ``batch``; returns this batch's partial report."""
        in_batch = np.zeros(len(self.tiles), dtype=bool)
        in_batch[batch] = True
        margin = self._read_margin_keys(batch)
        order = np.argsort(margin["spidx"], kind="stable")
        sorted_spidx = margin["spidx"][order]
        n_margin = len(order)
        primary_has = np.zeros(n_margin, dtype=bool)
        known_source = np.full(n_margin, -1, dtype=np.int64)
        expected = Keys(ratio=np.float64, ra=np.float64, dec=np.float64, source=np.int64)
        for source in sources_reaching(self.ctx, in_batch):
            self._scan_source(
                source, in_batch, sorted_spidx, order, margin, primary_has, known_source, expected
            )
        Recorder(self.ctx, self.report).compare(decide(self.ctx, expected.arrays()), margin, primary_has, known_source)
        return self.report


    def _read_margin_keys(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Keys (tile, spatial index, row hash, ra, dec, row number) of every margin row of the batch.

        Files that cannot be read or cast to the primary schema are skipped (the structure check or
        a structural line reports them).
        """
        keys = Keys(ra=np.float64, dec=np.float64, row=np.int64)
        schema = self.primary.schema
        for tile in batch:
            pixel = (int(self.tiles.orders[tile]), int(self.tiles.pixels[tile]))
            files = self.margin.files.get(pixel)
            if not files:
                continue
            parts = []
            for file in files:
                try:
                    table = read_parquet(file)
                except (OSError, pa.ArrowInvalid):
                    continue  # already reported by the structure check
                table, why = conform(table, schema)
                if table is None:
                    self.report.structural.append(f"{file}: {why}; its rows cannot be compared")
                    continue
                parts.append(table)
            if not parts:
                continue
            table = pa.concat_tables(parts)
            n = table.num_rows
            keys.add(
                np.full(n, tile),
                _index_of(table.column(self.primary.healpix_column)),
                row_hashes(table),
                ra=numpy_of(table.column(self.primary.ra_column)).astype(np.float64),
                dec=numpy_of(table.column(self.primary.dec_column)).astype(np.float64),
                row=np.arange(n, dtype=np.int64),
            )
        return keys.arrays()


    def _scan_source(
        self, source, in_batch, sorted_spidx, order, margin, primary_has, known_source, expected
    ):
        """Read one primary partition and gather the rows the batch's margins should hold (into
        ``expected``); flag margin rows that are exact copies of its rows (``primary_has``,
        ``known_source``).
        """
        s_order, s_pixel = int(self.tiles.orders[source]), int(self.tiles.pixels[source])
        table = self.primary.read_partition(s_order, s_pixel)
        n = table.num_rows
        self.report.sources_read[(s_order, s_pixel)] = n
        if n == 0:
            return
        hcol = table.column(self.primary.healpix_column)
        if hcol.null_count:
            raise InputCatalogError(f"primary partition {s_order}/{s_pixel}: null spatial index values")
        spidx = numpy_of(hcol).astype(np.int64, copy=False)
        ra = numpy_of(table.column(self.primary.ra_column)).astype(np.float64)
        dec = numpy_of(table.column(self.primary.dec_column)).astype(np.float64)
        own = self.tiles.containing(spidx << self.shift_index)
        outside = int((own != source).sum())
        if outside:
            self._warn_once(
                f"primary partition {s_order}/{s_pixel}: {outside} row(s) have a spatial index outside it "
                "(their own pixel is taken from the spatial index)"
            )

        rows, dest = candidates(self.ctx, ra, dec, own, source, in_batch, self._warn_once)
        rows, dest, ratio = cap_test(self.ctx, ra, dec, rows, dest)
        exp_rows, exp_tiles = rows, dest

        # margin rows whose spatial index occurs in this partition
        lo = np.searchsorted(sorted_spidx, spidx, side="left")
        hi = np.searchsorted(sorted_spidx, spidx, side="right")
        counts = hi - lo
        matched_rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        matched_margin = order[np.repeat(lo, counts) + ranks(counts)]

        need = np.unique(np.concatenate([exp_rows, matched_rows]))
        hashes = np.zeros(n, dtype=np.uint64)
        if len(need):
            hashes[need] = row_hashes(table.take(arrow_of(need)))
        if len(matched_rows):  # several rows may share a spatial index: set flags, never overwrite them
            known_source[matched_margin] = source
            primary_has[matched_margin[hashes[matched_rows] == margin["hash"][matched_margin]]] = True
        if len(exp_rows):
            expected.add(
                exp_tiles,
                spidx[exp_rows],
                hashes[exp_rows],
                ratio=ratio,
                ra=ra[exp_rows],
                dec=dec[exp_rows],
                source=np.full(len(exp_rows), source),
            )


    def _warn_once(self, message: str):
        """Add ``message`` to the report's warnings unless it is there already."""
        if message not in self.report.warnings:
            self.report.warnings.append(message)


def _index_of(column) -> np.ndarray:
    """A margin file's spatial index values, nulls as -1 (pyarrow's own conversion, which imports
    pandas, only when there are nulls)."""
    return numpy_of(column) if column.null_count == 0 else column.fill_null(-1).to_numpy()

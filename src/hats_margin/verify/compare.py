"""Comparing one batch: expected rows (from the search) against the margin's rows, and recording
missing, extra, altered, duplicated and borderline rows with examples in a partial report.

* **missing**: rows the contract puts in ``margin(P)`` that the file of ``P`` lacks.
* **extra**: exact copies of primary rows that the contract does not put in ``margin(P)``, with
  their distance to ``P`` in units of the threshold. Rows inside ``P`` itself are also structural.
* **altered**: margin rows that equal no primary row. A missing row whose ``(P, spatial index)``
  matches an altered row is counted once, as altered.
* **duplicates**: more copies of a row in one pixel than the primary holds.
* **borderline**: rows within ``rtol`` of the threshold on the other side; shown, never a failure.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hats_margin.verify.catalogs import conform, read_parquet
from hats_margin.verify.report import VerifyReport
from hats_margin.verify.search import ratios
from hats_margin.verify.tiles import ranks


class Recorder:
    """Compares the keys of one batch and records what differs in ``report``."""

    def __init__(self, ctx, report: VerifyReport):
        """A recorder writing into ``report``, with the example limit and ``rtol`` of ``ctx``."""
        self.ctx, self.report = ctx, report
        self.tiles, self.primary, self.margin = ctx.tiles, ctx.primary, ctx.margin
        self.max_examples, self.rtol, self.shift_index = ctx.max_examples, ctx.rtol, ctx.shift_index

    def compare(self, expected: dict, margin: dict, primary_has: np.ndarray, known_source: np.ndarray):
        """Match the expected keys against the margin's and record missing, extra, altered and
        duplicated rows (with examples) and per-pixel counts.
        """
        report = self.report
        n_exp, n_mar = len(expected["tile"]), len(margin["tile"])
        report.rows_expected += n_exp
        tile = np.concatenate([expected["tile"], margin["tile"]])
        spidx = np.concatenate([expected["spidx"], margin["spidx"]])
        hashes = np.concatenate([expected["hash"], margin["hash"]])
        is_margin = np.concatenate([np.zeros(n_exp, bool), np.ones(n_mar, bool)])
        sort = np.lexsort((is_margin, hashes, spidx, tile))
        if len(sort) == 0:
            return
        t, s, h, m = tile[sort], spidx[sort], hashes[sort], is_margin[sort]
        new_group = np.ones(len(sort), dtype=bool)
        new_group[1:] = (t[1:] != t[:-1]) | (s[1:] != s[:-1]) | (h[1:] != h[:-1])
        group = np.cumsum(new_group) - 1
        e_count = np.bincount(group, weights=~m, minlength=group[-1] + 1).astype(np.int64)
        m_count = np.bincount(group, weights=m, minlength=group[-1] + 1).astype(np.int64)
        rank = ranks(np.bincount(group))  # position inside the group (expected rows first)
        # expected rows beyond the margin's copies are missing
        e_rank = rank
        missing_pos = sort[(~m) & (e_rank >= m_count[group])]
        # margin rows beyond the expected copies: the first of a group with e == 0 is unexpected,
        # the others are duplicates
        m_rank = rank - e_count[group]
        surplus = m & (m_rank >= e_count[group])
        unexpected_pos = sort[surplus & (e_count[group] == 0) & (m_rank == 0)] - n_exp
        duplicate_pos = sort[surplus & ((e_count[group] > 0) | (m_rank > 0))] - n_exp
        self._record_duplicates(duplicate_pos, margin)

        is_copy = primary_has[unexpected_pos]
        altered_pos = unexpected_pos[~is_copy]
        extra_pos = unexpected_pos[is_copy]

        # a missing row that has an altered stand-in (same pixel and spatial index) counts once
        missing_pos = self._record_missing(self._absorb(missing_pos, expected, altered_pos, margin), expected)
        self._record_altered(altered_pos, margin, known_source)
        extra_pos = self._record_extra(extra_pos, margin)
        self._per_pixel(expected, margin, missing_pos, altered_pos, extra_pos)


    def _absorb(self, missing_pos, expected, altered_pos, margin) -> np.ndarray:
        """The missing rows left once those with an altered stand-in (same pixel and spatial index) are dropped."""
        if len(missing_pos) == 0 or len(altered_pos) == 0:
            return missing_pos
        keys = {(int(a), int(b)) for a, b in zip(margin["tile"][altered_pos], margin["spidx"][altered_pos])}
        stand_in = np.array(
            [
                (int(a), int(b)) in keys
                for a, b in zip(expected["tile"][missing_pos], expected["spidx"][missing_pos])
            ],
            dtype=bool,
        )
        return missing_pos[~stand_in]


    def _pixel_of(self, tile) -> str:
        """A tile as ``'order/pixel'``."""
        return f"{int(self.tiles.orders[tile])}/{int(self.tiles.pixels[tile])}"


    def _record_missing(self, pos, expected) -> np.ndarray:
        """Count and describe missing rows (borderline ones aside); returns the missing ones."""
        ratio = expected["ratio"][pos]
        unknown = np.isnan(ratio)
        ratio[unknown] = ratios(self.ctx, 
            expected["ra"][pos[unknown]], expected["dec"][pos[unknown]], expected["tile"][pos[unknown]]
        )
        expected["ratio"][pos] = ratio
        border = ratio >= 1.0 - self.rtol
        self._record_borderline(
            [
                {
                    "kind": "missing",
                    "pixel": self._pixel_of(expected["tile"][p]),
                    "spatial_index": int(expected["spidx"][p]),
                    "distance_ratio": float(expected["ratio"][p]),
                }
                for p in pos[border][: self.max_examples]
            ],
            int(border.sum()),
        )
        pos = pos[~border]
        self.report.missing += len(pos)
        room = self.max_examples - len(self.report.missing_examples)
        for p in pos[: max(room, 0)]:
            self.report.missing_examples.append(
                {
                    "pixel": self._pixel_of(expected["tile"][p]),
                    "spatial_index": int(expected["spidx"][p]),
                    "source": self._pixel_of(expected["source"][p]),
                    "ra": float(expected["ra"][p]),
                    "dec": float(expected["dec"][p]),
                    "distance_ratio": float(expected["ratio"][p]),
                }
            )
        return pos


    def _record_borderline(self, examples, count):
        """Count borderline rows and keep examples up to the limit."""
        self.report.borderline += count
        room = self.max_examples - len(self.report.borderline_examples)
        self.report.borderline_examples += examples[: max(room, 0)]


    def _record_altered(self, pos, margin, known_source):
        """Count margin rows equal to no primary row and keep examples (with their source partition if known)."""
        self.report.altered += len(pos)
        room = self.max_examples - len(self.report.altered_examples)
        for p in pos[: max(room, 0)]:
            tile, source = int(margin["tile"][p]), int(known_source[p])
            example = {
                "pixel": self._pixel_of(tile),
                "row": int(margin["row"][p]),
                "spatial_index": int(margin["spidx"][p]),
            }
            if source < 0:
                example["problem"] = "no primary row has this spatial index"
            else:
                example["source"] = self._pixel_of(source)
                example["differs"] = (
                    ",".join(self._differing_columns(tile, int(margin["row"][p]), source)) or "?"
                )
            self.report.altered_examples.append(example)


    def _differing_columns(self, tile: int, row: int, source: int) -> list[str]:
        """Columns in which a margin row differs from the closest primary row with its spatial index."""
        pixel = (int(self.tiles.orders[tile]), int(self.tiles.pixels[tile]))
        schema = self.primary.schema
        parts = []
        for file in self.margin.files.get(pixel, []):
            table, _ = conform(read_parquet(file), schema)
            if table is not None:
                parts.append(table)
        if not parts:
            return []
        margin_row = pa.concat_tables(parts).slice(row, 1).to_pylist()[0]
        table = self.primary.read_partition(int(self.tiles.orders[source]), int(self.tiles.pixels[source]))
        spidx = table.column(self.primary.healpix_column).to_numpy()
        candidates = table.take(pa.array(np.flatnonzero(spidx == margin_row[self.primary.healpix_column])))
        best = None
        for primary_row in candidates.to_pylist():
            diff = [k for k in schema.names if repr(primary_row[k]) != repr(margin_row[k])]
            if best is None or len(diff) < len(best):
                best = diff
        return best or []


    def _record_extra(self, pos, margin) -> np.ndarray:
        """Count and describe extra rows (borderline ones aside); returns the extra ones."""
        if len(pos) == 0:
            return pos
        tiles = margin["tile"][pos]
        own = self.tiles.containing(margin["spidx"][pos] << self.shift_index)
        ratio = ratios(self.ctx, margin["ra"][pos], margin["dec"][pos], tiles)
        is_self = own == tiles
        ratio[is_self] = 0.0
        border = ~is_self & (ratio <= 1.0 + self.rtol)
        self._record_borderline(
            [
                {
                    "kind": "extra",
                    "pixel": self._pixel_of(tiles[i]),
                    "spatial_index": int(margin["spidx"][pos[i]]),
                    "distance_ratio": float(ratio[i]),
                }
                for i in np.flatnonzero(border)[: self.max_examples]
            ],
            int(border.sum()),
        )
        real = ~border
        report = self.report
        report.extra += int(real.sum())
        report.self_rows += int(is_self.sum())
        if is_self.any() and report.self_example is None:
            report.self_example = self._pixel_of(tiles[np.flatnonzero(is_self)[0]])
        if real.any():
            report.max_extra_distance_ratio = max(report.max_extra_distance_ratio, float(ratio[real].max()))
            self.report.extra_ratios.append(ratio[real])
        # farthest first: the most telling examples
        room = self.max_examples - len(report.extra_examples)
        for i in np.flatnonzero(real)[np.argsort(-ratio[real], kind="stable")][: max(room, 0)]:
            report.extra_examples.append(
                {
                    "pixel": self._pixel_of(tiles[i]),
                    "spatial_index": int(margin["spidx"][pos[i]]),
                    "ra": float(margin["ra"][pos[i]]),
                    "dec": float(margin["dec"][pos[i]]),
                    "distance_ratio": float(ratio[i]),
                }
            )
        return pos[real]


    def _record_duplicates(self, pos, margin):
        """Count surplus copies of rows in one pixel and keep examples."""
        self.report.duplicates += len(pos)
        room = self.max_examples - len(self.report.duplicate_examples)
        for p in pos[: max(room, 0)]:
            self.report.duplicate_examples.append(
                {
                    "pixel": self._pixel_of(margin["tile"][p]),
                    "row": int(margin["row"][p]),
                    "spatial_index": int(margin["spidx"][p]),
                }
            )


    def _per_pixel(self, expected, margin, missing_pos, altered_pos, extra_pos):
        """Rows, expected, missing, altered and extra per pixel, for every pixel with any of them."""
        n = len(self.tiles)
        counts = {
            "rows": np.bincount(margin["tile"], minlength=n),
            "expected": np.bincount(expected["tile"], minlength=n),
            "missing": np.bincount(expected["tile"][missing_pos], minlength=n),
            "altered": np.bincount(margin["tile"][altered_pos], minlength=n),
            "extra": np.bincount(margin["tile"][extra_pos], minlength=n),
        }
        for tile in np.flatnonzero(sum(counts.values())):
            key = (int(self.tiles.orders[tile]), int(self.tiles.pixels[tile]))
            self.report.per_pixel[key] = {name: int(values[tile]) for name, values in counts.items()}

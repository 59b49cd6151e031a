"""What a verification found: :class:`VerifyReport`, its text summary, and the merge of the
partial reports of the batches (one per Dask task)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

EXTRA_BINS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)

@dataclass
class VerifyReport:
    """What :func:`verify_margin` found. Counts are rows; ``*_examples`` hold at most
    ``max_examples`` dicts each."""

    margin_path: str
    primary_path: str
    threshold_arcsec: float
    exact: bool
    """True when extras count as failures (the margin claims fine filtering)."""
    pixels: int = 0
    """Margin pixels (files) compared."""
    rows_in_margin: int = 0
    rows_expected: int = 0
    primary_rows_read: int = 0
    missing: int = 0
    extra: int = 0
    altered: int = 0
    duplicates: int = 0
    borderline: int = 0
    self_rows: int = 0
    """Extra rows lying inside the pixel whose margin holds them (included in ``extra``)."""
    max_extra_distance_ratio: float = 0.0
    """Largest distance/threshold over the extra rows (0 when there is none)."""
    extra_histogram: dict[str, int] = field(default_factory=dict)
    structural: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing_examples: list[dict] = field(default_factory=list)
    extra_examples: list[dict] = field(default_factory=list)
    altered_examples: list[dict] = field(default_factory=list)
    duplicate_examples: list[dict] = field(default_factory=list)
    borderline_examples: list[dict] = field(default_factory=list)
    per_pixel: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)
    """(order, pixel) -> rows/expected/missing/extra/altered, for every pixel with any of them."""
    seconds: float = 0.0
    self_example: str | None = field(default=None, repr=False)
    """A pixel whose margin holds rows of its own (for the structural line)."""
    extra_ratios: list = field(default_factory=list, repr=False)
    """distance/threshold of every extra row (kept until the histogram is made)."""
    sources_read: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)
    """Rows of each primary partition read (a partition read by several batches counts once)."""

    @property
    def ok(self) -> bool:
        """True when nothing is missing, altered, duplicated or structurally wrong (and, if exact, nothing extra)."""
        failed = self.missing or self.altered or self.duplicates or self.structural
        return not failed and not (self.exact and self.extra)

    def summary(self) -> str:
        """The report as text: paths, counts, OK/FAILED, extra-distance histogram, problems and examples."""
        mode = "exact (extras fail)" if self.exact else "coarse (extras allowed)"
        lines = [
            f"margin   {self.margin_path}",
            f"primary  {self.primary_path}",
            (
                f"threshold {self.threshold_arcsec:g} arcsec, {mode}; {self.pixels} pixel file(s), "
                f"{self.rows_in_margin} margin rows, {self.rows_expected} expected, "
                f"{self.primary_rows_read} primary rows read, {self.seconds:.1f} s"
            ),
            f"result   {'OK' if self.ok else 'FAILED'}: {self.missing} missing, {self.extra} extra, "
            f"{self.altered} altered, {self.duplicates} duplicated, {len(self.structural)} structural problem(s)"
            + (f", {self.borderline} borderline" if self.borderline else ""),
        ]
        if self.extra:
            histogram = ", ".join(f"{k}: {v}" for k, v in self.extra_histogram.items() if v)
            lines.append(
                f"extra rows: max distance {self.max_extra_distance_ratio:.4g} x threshold ({histogram})"
                + (f"; {self.self_rows} inside their own pixel" if self.self_rows else "")
            )
        for title, problems in (("structural", self.structural), ("warning", self.warnings)):
            lines += [f"{title}: {p}" for p in problems]
        for title, examples in (
            ("missing", self.missing_examples),
            ("extra", self.extra_examples),
            ("altered", self.altered_examples),
            ("duplicate", self.duplicate_examples),
            ("borderline", self.borderline_examples),
        ):
            if examples:
                lines.append(f"{title} examples:")
                lines += [f"  {_format_example(e)}" for e in examples]
        return "\n".join(lines)


def _format_example(example: dict) -> str:
    """An example as ``key=value`` pairs, floats to 10 significant digits."""
    parts = []
    for key, value in example.items():
        if isinstance(value, float):
            value = f"{value:.10g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def merge(total: VerifyReport, part: VerifyReport, max_examples: int):
    """Add a batch's partial report to ``total`` (counts, examples up to ``max_examples``)."""
    for name in ("rows_expected", "missing", "extra", "altered", "duplicates", "borderline", "self_rows"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.max_extra_distance_ratio = max(total.max_extra_distance_ratio, part.max_extra_distance_ratio)
    total.structural += part.structural
    total.warnings += [w for w in part.warnings if w not in total.warnings]
    for kind in ("missing", "extra", "altered", "duplicate", "borderline"):
        kept = getattr(total, f"{kind}_examples")
        kept += getattr(part, f"{kind}_examples")[: max(max_examples - len(kept), 0)]
    total.per_pixel.update(part.per_pixel)
    total.self_example = total.self_example or part.self_example
    total.extra_ratios += part.extra_ratios
    total.sources_read.update(part.sources_read)


def finish(report: VerifyReport):
    """Totals that need every batch: rows read, the extra-distance histogram."""
    report.primary_rows_read = sum(report.sources_read.values())
    if report.self_rows:
        report.structural.append(
            f"{report.self_rows} margin row(s) lie inside the very pixel whose margin holds them "
            f"(e.g. pixel {report.self_example})"
        )
    ratios = np.concatenate(report.extra_ratios) if report.extra_ratios else np.zeros(0)
    histogram = {}
    for lo, hi in itertools.pairwise(EXTRA_BINS):
        label = f"({lo:g}, {hi:g}]" if math.isfinite(hi) else f"> {lo:g}"
        histogram[label] = int(((ratios > lo) & (ratios <= hi)).sum())
    histogram["self (0)"] = report.self_rows
    report.extra_histogram = histogram
    report.extra_ratios = []

"""Check a margin cache against its primary catalog, row by row, independently of the pipeline.

The contract
------------
For a destination pixel ``P`` (a partition of the primary or a pixel of its negative tree),
``margin(P)`` is the set of rows ``r`` of the primary such that ``r`` is not in ``P`` (by its
spatial index) and the great-circle distance from ``(ra, dec)`` of ``r`` to the closed region
of ``P`` is ``<= threshold``. Every margin row must be an exact copy of a primary row (all
columns, the primary's ``_common_metadata`` schema).

``VerifyReport.ok`` is False on any missing, altered, duplicated row or structural problem.
Extra rows fail only an *exact* margin: one whose ``hats_margin_fine_filtering`` property is
``true`` (hats-margin's default). A margin without that property (hats-import) or with
``false`` is *coarse*: a superset by design, so extras are reported but allowed.

Modules: ``checker`` (the whole run, batches on Dask), ``structure`` (link to the primary and
schema first, then files, counts, partition_info.csv, _metadata), ``batch`` (one batch of
destination pixels), ``search`` (the verifier's own candidate search: destinations from the
primary's partitions and a negative tree computed in ``tiles``, candidates from the rows'
(ra, dec), never the pipeline's geometry), ``compare`` (missing/extra/altered/duplicates),
``hashing`` (row identity), ``catalogs`` (reading both catalogs), ``report``.

Memory: primary partitions are streamed one at a time; a batch holds a few numbers per margin
row and candidate (~60 bytes each), at most ``max_rows_in_memory`` margin rows per batch.
"""

from hats_margin.verify.checker import verify_margin
from hats_margin.verify.report import VerifyReport

__all__ = ["VerifyReport", "verify_margin"]

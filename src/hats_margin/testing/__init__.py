"""Helpers for tests and benchmarks, not used by the pipeline at run time.

:mod:`hats_margin.testing.synthetic` writes synthetic, valid HATS catalogs (random sky-like
rows or given points). Nothing in the rest of the package imports this subpackage.
"""

"""Fixtures of the reliability suite; the helpers live in harness.py."""

from harness import baselines, sentinels, source_copy  # noqa: F401

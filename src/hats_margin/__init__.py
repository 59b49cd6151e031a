"""hats-margin: exact, fast, resumable margin caches for HATS catalogs, on Dask.

Names are imported on first use, so ``hats-margin --help`` does not pay for Dask and hats.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hats_margin._version import __version__

_LAZY = {
    "ArgumentError": "hats_margin.errors",
    "HatsMarginError": "hats_margin.errors",
    "InputCatalogError": "hats_margin.errors",
    "OutputExistsError": "hats_margin.errors",
    "OutputLockedError": "hats_margin.errors",
    "ResumeMismatchError": "hats_margin.errors",
    "StageFailedError": "hats_margin.errors",
    "ScriptGuardError": "hats_margin.errors",
    "MarginCacheArguments": "hats_margin.arguments",
    "MarginCacheResult": "hats_margin.orchestrator",
    "ManyMarginsResult": "hats_margin.orchestrator",
    "pipeline": "hats_margin.orchestrator",
    "pipeline_with_client": "hats_margin.orchestrator",
    "verify_margin": "hats_margin.verify",
}

__all__ = [
    "ArgumentError",
    "HatsMarginError",
    "InputCatalogError",
    "ManyMarginsResult",
    "MarginCacheArguments",
    "MarginCacheResult",
    "OutputExistsError",
    "OutputLockedError",
    "ResumeMismatchError",
    "ScriptGuardError",
    "StageFailedError",
    "__version__",
    "pipeline",
    "pipeline_with_client",
    "verify_margin",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from hats_margin.arguments import MarginCacheArguments
    from hats_margin.errors import (
        ArgumentError,
        HatsMarginError,
        InputCatalogError,
        OutputExistsError,
        OutputLockedError,
        ResumeMismatchError,
        ScriptGuardError,
        StageFailedError,
    )
    from hats_margin.orchestrator import ManyMarginsResult, MarginCacheResult, pipeline, pipeline_with_client
    from hats_margin.verify import verify_margin


def __getattr__(name: str):
    """Import a public name's home module on first use (keeps ``import hats_margin`` light)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hats_margin' has no attribute {name!r}")


def __dir__():
    """The public names (``__all__``)."""
    return __all__

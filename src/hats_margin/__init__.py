"""hats-margin: exact, fast, resumable margin caches for HATS catalogs, on Dask."""

from hats_margin._version import __version__
from hats_margin.arguments import MarginCacheArguments
from hats_margin.errors import (
    ArgumentError,
    HatsMarginError,
    InputCatalogError,
    OutputExistsError,
    OutputLockedError,
    ResumeMismatchError,
    StageFailedError,
)
from hats_margin.pipeline import MarginCacheResult, pipeline, pipeline_with_client

__all__ = [
    "ArgumentError",
    "HatsMarginError",
    "InputCatalogError",
    "MarginCacheArguments",
    "MarginCacheResult",
    "OutputExistsError",
    "OutputLockedError",
    "ResumeMismatchError",
    "StageFailedError",
    "__version__",
    "pipeline",
    "pipeline_with_client",
]

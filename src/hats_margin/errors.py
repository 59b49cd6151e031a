"""One exception tree for hats-margin.

Every error the package raises on purpose derives from :class:`HatsMarginError`, and
each also derives from the builtin a caller would naturally catch, so both
``except HatsMarginError`` and ``except ValueError`` work::

    HatsMarginError (Exception)
    ├── ArgumentError (ValueError)          a bad argument value; names the argument
    ├── InputCatalogError (ValueError)      the input catalog is unusable; names the file/partition
    ├── OutputExistsError (FileExistsError) the output already holds a catalog or foreign files
    ├── ResumeMismatchError (ValueError)    intermediate files belong to a run with other values
    ├── OutputLockedError (RuntimeError)    another live run holds the output lock
    ├── StageFailedError (RuntimeError)     one or more tasks of a stage failed; lists the keys
    └── ScriptGuardError (RuntimeError)     worker processes asked for from an unguarded script
"""

from __future__ import annotations


class HatsMarginError(Exception):
    """Base class of every error raised on purpose by hats-margin."""


class ArgumentError(HatsMarginError, ValueError):
    """A MarginCacheArguments value is invalid. The message names the argument."""


class InputCatalogError(HatsMarginError, ValueError):
    """The input catalog cannot take a margin. The message names the problem and the path."""


class OutputExistsError(HatsMarginError, FileExistsError):
    """The output directory already holds a valid catalog or files that are not ours."""


class ResumeMismatchError(HatsMarginError, ValueError):
    """The intermediate files on disk were made by a run with different values."""


class OutputLockedError(HatsMarginError, RuntimeError):
    """Another live run is writing the same output."""


class StageFailedError(HatsMarginError, RuntimeError):
    """Tasks of a pipeline stage failed.

    Attributes
    ----------
    stage : str
        name of the stage (``"mapping"``, ``"reducing"``)
    failures : dict[str, BaseException]
        task key -> the original exception
    """

    def __init__(self, stage: str, failures: dict[str, BaseException], hint: str = ""):
        """Message: the count and keys of the failed tasks, then the first ten errors, then ``hint``."""
        self.stage = stage
        self.failures = dict(failures)
        lines = [f"{len(failures)} {stage} task(s) failed: {', '.join(sorted(failures))}"]
        for key in sorted(failures)[:10]:
            exc = failures[key]
            lines.append(f"  {key}: {type(exc).__name__}: {exc}")
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ScriptGuardError(HatsMarginError, RuntimeError):
    """pipeline() with worker processes was called from the top level of a script without an
    ``if __name__ == "__main__":`` guard (the workers would re-run the script)."""

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
        keys = sorted(failures)
        shown = ", ".join(keys[:_KEYS_SHOWN]) + (f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else "")
        detailed = keys if len(keys) <= _DETAILS_SHOWN else keys[:1]
        details = "; ".join(f"{key}: {type(failures[key]).__name__}: {one_line(failures[key])}" for key in detailed)
        if len(keys) > _DETAILS_SHOWN:
            details = f"first: {details} (every task's error: run with --verbose, or see this error's .failures)"
        message = f"{len(keys)} {stage} task(s) failed: {shown}. {details}."
        if hint:
            message += f" {one_line(hint)}"
        super().__init__(message)


class ScriptGuardError(HatsMarginError, RuntimeError):
    """pipeline() with worker processes was called from the top level of a script without an
    ``if __name__ == "__main__":`` guard (the workers would re-run the script)."""


_KEYS_SHOWN = 5
_DETAILS_SHOWN = 3


def one_line(value) -> str:
    """A message on one line (newlines and runs of spaces become one space)."""
    return " ".join(str(value).split())


def describe_invalid(exc: BaseException) -> str:
    """One line naming the bad key(s) of a failed validation (pydantic's ``errors()``), else the
    error's own text on one line."""
    errors = getattr(exc, "errors", None)
    items = None
    if callable(errors):
        try:
            items = errors()
        except Exception:  # noqa: BLE001 - not pydantic's errors(): fall back to the text
            items = None
    if not items:
        return one_line(exc)
    parts = []
    for item in items[:3]:
        key = ".".join(str(x) for x in item.get("loc", ()))
        message = one_line(item.get("msg", "invalid value"))
        value = item.get("input")
        if key and not isinstance(value, dict):
            parts.append(f"{key}: {message} (got {value!r})")
        elif key:
            parts.append(f"{key}: {message}")
        else:
            parts.append(message)
    if len(items) > 3:
        parts.append(f"and {len(items) - 3} more")
    return "; ".join(parts)

"""Angles as astronomers write them: ``10``, ``10arcsec``, ``10"``, ``1.5arcmin``, ``1deg``, ``500mas``.

Pure functions, no I/O and no heavy imports (the command line parses thresholds before it
loads anything else). A bare number is arcseconds. An astropy ``Quantity`` is accepted by
duck typing (anything with ``.unit`` and ``.to("arcsec")``), so astropy is not a dependency.
"""

from __future__ import annotations

import math
import numbers
import re

from hats_margin.errors import ArgumentError

EXTREME_LOW_ARCSEC = 0.01
"""Thresholds below this need an explicit confirmation (likely a unit mistake)."""
EXTREME_HIGH_ARCSEC = 10 * 3600.0
"""Thresholds above this (10 degrees) need an explicit confirmation."""

# unit spelling -> arcseconds per unit (lower case; '"' and "'" are the symbols)
_UNITS = {
    "": 1.0,
    "arcsec": 1.0, "arcsecs": 1.0, "arcs": 1.0, "as": 1.0, '"': 1.0, "″": 1.0,
    "arcmin": 60.0, "arcmins": 60.0, "amin": 60.0, "'": 60.0, "′": 60.0,
    "deg": 3600.0, "degs": 3600.0, "degree": 3600.0, "degrees": 3600.0, "d": 3600.0, "°": 3600.0,
    "mas": 0.001,
}
_NUMBER_AND_UNIT = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\d\s.+-][^\s]*)?\s*$")
VALID_SPELLINGS = "10 (arcsec), 10arcsec, 10\", 1.5arcmin, 1.5', 1deg, 1d, 500mas"


def threshold_arcsec(value, name: str = "margin_threshold") -> float:
    """``value`` (number of arcsec, a string with a unit, or an astropy Quantity) in arcseconds.

    Raises ArgumentError naming ``name`` and the valid spellings for anything that is not a
    finite angle > 0.
    """
    if isinstance(value, bool):
        raise ArgumentError(f"{name} must be an angle like {VALID_SPELLINGS}, not {value!r}")
    if isinstance(value, numbers.Real):
        arcsec = float(value)
    elif hasattr(value, "unit") and hasattr(value, "to"):
        arcsec = _quantity_arcsec(value, name)
    elif isinstance(value, str):
        arcsec = _text_arcsec(value, name)
    else:
        raise ArgumentError(
            f"{name} must be an angle like {VALID_SPELLINGS} (or an astropy Quantity), "
            f"not {type(value).__name__} {value!r}"
        )
    if not math.isfinite(arcsec) or arcsec <= 0:
        raise ArgumentError(f"{name} must be a finite angle > 0 (arcseconds unless a unit is given), got {value!r}")
    return arcsec


def _quantity_arcsec(value, name: str) -> float:
    """An astropy Quantity in arcsec; :class:`ArgumentError` if it is not an angle."""
    try:
        converted = value.to("arcsec")
        arcsec = float(getattr(converted, "value", converted))
    except Exception as exc:
        raise ArgumentError(f"{name} {value!r} is not an angle (unit {value.unit}): {exc}") from exc
    return arcsec


def _text_arcsec(text: str, name: str) -> float:
    """A text angle like ``'10arcsec'`` or ``'0.5 deg'`` in arcsec; :class:`ArgumentError` if unreadable."""
    match = _NUMBER_AND_UNIT.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ArgumentError(f"{name} {text!r} is not an angle: write it like {VALID_SPELLINGS}")
    return float(match.group(1)) * _UNITS[unit]


def format_angle(arcsec: float) -> str:
    """A short readable angle: ``0.0028 -> '2.8 mas'``, ``10.08 -> '10.08 arcsec'``, ``36000 -> '10 deg'``."""
    if arcsec >= 3600:
        return f"{arcsec / 3600:.4g} deg"
    if arcsec >= 60:
        return f"{arcsec / 60:.4g} arcmin"
    if arcsec >= 1:
        return f"{arcsec:.4g} arcsec"
    return f"{arcsec * 1000:.4g} mas"


def extreme_threshold_message(arcsec: float, confirm: str) -> str | None:
    """None for a plausible margin width; otherwise why it looks like a unit mistake, what was
    probably meant, and ``confirm`` (how to insist)."""
    if EXTREME_LOW_ARCSEC <= arcsec <= EXTREME_HIGH_ARCSEC:
        return None
    if arcsec < EXTREME_LOW_ARCSEC:
        return (
            f"margin_threshold {arcsec:g} arcsec ({format_angle(arcsec)}) is below {EXTREME_LOW_ARCSEC:g} arcsec; "
            f"did you mean {arcsec:g} deg = {arcsec * 3600:g} arcsec, or {arcsec:g} arcmin = {arcsec * 60:g} arcsec? "
            f"Give the unit (e.g. {arcsec:g}deg), or pass {confirm} to confirm {arcsec:g} arcsec"
        )
    return (
        f"margin_threshold {arcsec:g} arcsec ({format_angle(arcsec)}) is above 10 deg; "
        f"did you mean {arcsec:g} mas = {arcsec / 1000:g} arcsec? Give the unit (e.g. {arcsec:g}mas), "
        f"or pass {confirm} to confirm {format_angle(arcsec)}"
    )


def short_angle(arcsec: float) -> str:
    """The short angle of default names (truncated, not rounded): ``3600 -> 1deg``,
    ``60 -> 1arcmin``, ``10 -> 10arcs``, ``0.5 -> 500mas``."""
    if arcsec >= 3600:
        return f"{int(arcsec / 3600)}deg"
    if arcsec >= 60:
        return f"{int(arcsec / 60)}arcmin"
    if arcsec >= 1:
        return f"{int(arcsec)}arcs"
    mas = round(arcsec * 1000, 6)
    return f"{int(mas)}mas" if mas >= 1 else f"{mas:g}mas"

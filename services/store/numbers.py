"""Numbers a store holds that no double does, read as their exact text: ``NumberText``.

SQLite keeps a number column as a double, so what it answers is what it holds. PostgreSQL's ``numeric`` holds more:
``NaN`` and ``±Infinity`` (the Data API takes them, and the frontend writes it directly), and more significant digits
than a double keeps (``select 100.00 / 3`` is ``33.3333333333333333``); a ``jsonb`` number has any number of digits.
Read as floats, these are values no JSON encoder may write (``NaN``) or values the store does not hold (a rounded
``33.333333333333336``), which the user would be shown and a confirmation would compare
(``services/agents/actions.py``).
So a number is a float only when the float is exactly that number; otherwise it is its text, whole, as a
``NumberText`` (a ``str``): strict JSON everywhere, and what the user sees and confirms is what the database holds.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any


# How PostgreSQL writes the numerics that are not finite, as JSON strings (JSON has no such numbers).
_NOT_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})


class NumberText(str):
    """A number read as its exact text because no double holds it: ``"NaN"``, ``"Infinity"``,
    ``"33.3333333333333333"``. Written to JSON it is a string; ``holds_number_text`` finds it."""

    __slots__ = ()


def json_number(text: str) -> float | NumberText:
    """A JSON number with a fraction or an exponent (``json.loads``' ``parse_float``): a float when the float's own
    shortest spelling is the same number, else its text (``1e400`` would be infinite, ``0.1234567890123456789``
    rounded)."""
    value = float(text)
    if math.isfinite(value) and (repr(value) == text or Decimal(repr(value)) == Decimal(text)):
        return value
    return NumberText(text)


def json_integer(text: str) -> int | NumberText:
    """A JSON integer (``parse_int``): an int, or its text past the digits Python converts (``sys.int_info``)."""
    try:
        return int(text)
    except ValueError:
        return NumberText(text)


def as_double(value: Any) -> float | NumberText:
    """A number column's value as SQLite's REAL holds it, or its exact text when no double holds it: a JSON integer
    past 2**53 or a double's range, or PostgreSQL's ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, which JSON can only
    carry as strings. Any other string is no number (``ValueError``)."""
    if isinstance(value, NumberText):
        return value
    if isinstance(value, str):
        if value not in _NOT_FINITE:
            raise ValueError("not a number")
        return NumberText(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            double = float(value)
        except OverflowError:
            return NumberText(str(value))
        return double if int(double) == value else NumberText(str(value))
    double = float(value)
    if math.isfinite(double):
        return double
    return NumberText("NaN" if math.isnan(double) else "Infinity" if double > 0 else "-Infinity")


def holds_number_text(value: Any) -> bool:
    """Whether ``value`` is, or has anywhere inside it, a ``NumberText``."""
    if isinstance(value, NumberText):
        return True
    if isinstance(value, list):
        return any(holds_number_text(item) for item in value)
    if isinstance(value, dict):
        return any(holds_number_text(item) for item in value.values())
    return False

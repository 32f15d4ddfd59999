"""Shard key values as PostgreSQL will store them: a row is placed by the stored value.

A strategy hashes (or compares) the Python value it is given, but the row lands
in the database with the value PostgreSQL *stores*, and is later looked up by
that. The two differ whenever PostgreSQL converts: ``1.5`` in an ``integer``
column is stored as 2 (from ``numeric``, half away from zero) or as 2 from a
``float8`` (``rint``, half to even: ``2.5`` becomes 2, not 3), and which of the
two happens depends on the driver (psycopg2 sends a Python float as a numeric
literal, psycopg 3 as ``float8``). Placing by the Python value put such rows on
the wrong shard, where reads by their key never look.

:func:`stored_key` returns, for a value and the key column, exactly what
PostgreSQL stores whatever the driver, or raises :class:`ValueError` /
:class:`TypeError` saying why the value is refused. The rules, by column type:

* integer types (``smallint``, ``integer``, ``bigint``): Python ints, integral
  floats and Decimals (``7.0``, ``Decimal("7.00")``) and ASCII decimal strings
  (``"7"``, ``" -7 "``) become the int; non-integral numbers are refused (the
  drivers would round them differently), as are values outside the column's range;
* ``numeric(p, s)``: Decimals, ints, ASCII decimal strings, and floats whose
  shortest repr has at most 15 significant digits (PostgreSQL converts a
  ``float8`` to ``numeric`` through 15 digits, psycopg2 sends the repr: only then do
  they agree), rounded half away from zero to scale ``s`` as PostgreSQL does;
  a value too large for ``p`` is refused. NaN and infinities are refused;
* ``text``/``varchar(n)``: strings and ints (ints as their decimal digits); a
  string longer than ``n`` is refused (PostgreSQL would raise, or silently cut
  trailing spaces), as is one holding NUL; ``char(n)``: trailing spaces do not
  count (PostgreSQL pads and compares without them);
* ``uuid``: :class:`uuid.UUID` and the string forms PostgreSQL accepts (any case,
  optional braces, a hyphen after any group of four digits);
* ``date``: dates, naive datetimes at midnight and ``YYYY-MM-DD`` strings; a
  time of day or a time zone would be dropped or applied by the session's
  ``TimeZone``, so it is refused;
* ``timestamp``: naive datetimes (and dates, at midnight); ``timestamptz``:
  aware datetimes, compared as the same instant in UTC. The other kind is refused
  (PostgreSQL would interpret it in the session's ``TimeZone``).

Other types keep their Python value. Refusing is preferred wherever what
PostgreSQL stores depends on the driver or the session: a refused key raises
:class:`~sqlalchemy_scale.ShardKeyError` before anything is written.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
import uuid
from typing import Any

from sqlalchemy import types as sqltypes
from sqlalchemy.sql.elements import ColumnElement

__all__ = ["stored_key"]

_INT_RANGES: tuple[tuple[type[sqltypes.Integer], int], ...] = (
    (sqltypes.SmallInteger, 16),
    (sqltypes.BigInteger, 64),
    (sqltypes.Integer, 32),
)
# PostgreSQL's input functions skip C-locale whitespace only, and read ASCII digits only.
_WS = "[ \t\n\r\v\f]*"
_INT_TEXT = re.compile(rf"{_WS}[+-]?[0-9]+{_WS}", re.ASCII)
_NUMERIC_TEXT = re.compile(
    rf"{_WS}[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?{_WS}", re.ASCII
)
_UUID_TEXT = re.compile(r"\{?[0-9a-fA-F]{4}(-?[0-9a-fA-F]{4}){7}\}?", re.ASCII)
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_MAX_EXPONENT = 1000
# float8 -> numeric goes through this many significant digits (DBL_DIG).
_FLOAT_DIGITS = 15


def stored_key(value: Any, column: ColumnElement[Any]) -> Any:
    """The value PostgreSQL stores when ``value`` is written to ``column``.

    Raises :class:`ValueError` or :class:`TypeError` (with the reason) for a value that
    PostgreSQL would refuse, or would store differently depending on the driver.
    """
    if isinstance(value, bool):
        raise TypeError("booleans are not shard keys")
    type_ = column.type
    if isinstance(type_, sqltypes.Integer):
        return _integer(value, type_)
    if isinstance(type_, sqltypes.Numeric) and not isinstance(type_, sqltypes.Float):
        return _numeric(value, type_)
    if isinstance(type_, sqltypes.Enum):
        return value  # the enum's own values; PostgreSQL refuses others
    if isinstance(type_, sqltypes.String):
        return _text(value, type_)
    if isinstance(type_, sqltypes.Uuid):
        return _uuid(value)
    if isinstance(type_, sqltypes.DateTime):
        return _timestamp(value, timezone=bool(type_.timezone))
    if isinstance(type_, sqltypes.Date):
        return _date(value)
    return _python_type(value, type_)


def _integer(value: Any, type_: sqltypes.Integer) -> int:
    if isinstance(value, int):
        number = value
    elif isinstance(value, float | decimal.Decimal):
        if not _is_finite(value):
            raise ValueError(f"{value!r} is not a number an integer column can store")
        if value != int(value):
            raise ValueError(
                "an integer column does not store fractions; PostgreSQL would round it, "
                "differently for float and Decimal, so round it yourself"
            )
        number = int(value)
        if isinstance(value, float) and decimal.Decimal(repr(value)) != number:
            # psycopg2 sends the repr (7.11221106277373e+16 is ...300), psycopg 3 the
            # binary value (...296): only a float whose repr is exact means one integer.
            raise ValueError("a float this large is stored differently by each driver")
    elif isinstance(value, str):
        if not _INT_TEXT.fullmatch(value):
            raise ValueError("not an integer in decimal digits")
        number = int(value)
    else:
        raise TypeError(f"a {type(value).__name__} is not an integer")
    bits = next(b for cls, b in _INT_RANGES if isinstance(type_, cls))
    if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
        raise ValueError(f"out of range for a {bits}-bit integer column")
    return number


def _numeric(value: Any, type_: sqltypes.Numeric[Any]) -> decimal.Decimal:
    if isinstance(value, decimal.Decimal):
        number = value
    elif isinstance(value, int):
        number = decimal.Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is refused as a shard key")
        number = decimal.Decimal(repr(value))
        if len(number.as_tuple().digits) > _FLOAT_DIGITS and number != 0:
            raise ValueError(
                f"a float with more than {_FLOAT_DIGITS} significant digits is stored "
                "differently by each driver; pass a Decimal"
            )
    elif isinstance(value, str):
        if not _NUMERIC_TEXT.fullmatch(value):
            raise ValueError("not a number in decimal notation")
        number = decimal.Decimal(value.strip(" \t\n\r\v\f"))
    else:
        raise TypeError(f"a {type(value).__name__} is not a number")
    if not number.is_finite():
        raise ValueError(f"{value!r} is refused as a shard key")
    if number and not -_MAX_EXPONENT <= number.adjusted() <= _MAX_EXPONENT:
        raise ValueError("outside the magnitudes placed as shard keys (1e-1000 to 1e1000)")
    precision, scale = type_.precision, type_.scale
    if precision is not None and scale is None:
        scale = 0  # numeric(p) is numeric(p, 0)
    if scale is not None:
        with decimal.localcontext() as ctx:
            ctx.prec = max(len(number.as_tuple().digits) + abs(scale) + 2, 28)
            number = number.quantize(decimal.Decimal(1).scaleb(-scale), decimal.ROUND_HALF_UP)
    if precision is not None and abs(number) >= decimal.Decimal(10) ** (precision - (scale or 0)):
        raise ValueError(f"too large for numeric({precision}, {scale})")
    return number


def _text(value: Any, type_: sqltypes.String) -> str:
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        # PostgreSQL's text form of a float, Decimal or date need not be str()'s.
        raise TypeError(f"a {type(value).__name__} is not text; pass a str")
    if "\x00" in text:
        raise ValueError("PostgreSQL text cannot hold NUL characters")
    if isinstance(type_, sqltypes.CHAR):
        text = text.rstrip(" ")  # char(n) pads with spaces and compares without them
    if type_.length is not None and len(text) > type_.length:
        raise ValueError(f"longer than the column's {type_.length} characters")
    return text


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        if not _UUID_TEXT.fullmatch(value) or (value[0] == "{") != (value[-1] == "}"):
            raise ValueError("not a UUID in a form PostgreSQL reads")
        return uuid.UUID(hex=value.strip("{}").replace("-", ""))
    raise TypeError(f"a {type(value).__name__} is not a UUID")


def _date(value: Any) -> datetime.date:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None or value.time() != datetime.time():
            raise ValueError(
                "a date column keeps no time of day or time zone (PostgreSQL would drop them, "
                "or apply the session's TimeZone); pass a date"
            )
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        if not _DATE_TEXT.fullmatch(value):
            raise ValueError("not a date as YYYY-MM-DD")
        return datetime.date.fromisoformat(value)
    raise TypeError(f"a {type(value).__name__} is not a date")


def _timestamp(value: Any, *, timezone: bool) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        if timezone and value.tzinfo is None:
            raise ValueError(
                "a naive datetime in a timestamptz column depends on the session's TimeZone; "
                "pass an aware datetime"
            )
        if not timezone and value.tzinfo is not None:
            raise ValueError(
                "an aware datetime in a timestamp column is converted by the session's "
                "TimeZone; pass a naive datetime"
            )
        return value.astimezone(datetime.UTC) if timezone else value
    if isinstance(value, datetime.date) and not timezone:
        return datetime.datetime.combine(value, datetime.time())
    raise TypeError(
        f"a {type(value).__name__} is not a {'timestamptz' if timezone else 'timestamp'}"
    )


def _python_type(value: Any, type_: Any) -> Any:
    try:
        python_type = type_.python_type
    except NotImplementedError:
        return value
    if isinstance(value, python_type):
        return value
    if python_type in (int, str, float):
        return python_type(value)
    return value


def _is_finite(value: float | decimal.Decimal) -> bool:
    return value.is_finite() if isinstance(value, decimal.Decimal) else math.isfinite(value)

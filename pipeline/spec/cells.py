"""One cell of a prompt table -> a typed parameter value, or a :class:`RowError` that says
what is wrong with it. The rules every format shares: an empty cell (null, or blank text)
means "use the default"; text stays text; a float is a whole number only when it is
exactly one (a float seed or id beyond 2^53 may already have been rounded, so it is an
error, not a guess). Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from pipeline.spec.catalog import ModelEntry

# Seeds stay below 2**63: the seed column is a signed 64-bit integer (Parquet int64).
SEED_SPACE = 2**63
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class RowError(ValueError):
    """One reason a row cannot be generated."""


def missing(value: Any) -> bool:
    """The one rule for empty cells, the same for every parameter and every format: null
    (Parquet, JSON) and empty or blank text (an empty CSV/TSV cell) both mean "use the
    default". NaN is not empty: it is a number that is not one, and rejected as such."""
    return value is None or (isinstance(value, str) and not value.strip())


# From here on a float64 no longer holds every whole number: 2**53 + 1 reads back as 2**53.
EXACT_FLOAT = 2**53


def whole(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RowError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise RowError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(number, float):
        return whole_float(number, value, name)
    raise RowError(f"{name} must be a whole number, got {value!r}")


def whole_float(number: float, value: Any, name: str) -> int:
    """A float that stands for a whole number exactly, as that number; RowError otherwise.
    pandas stores an integer column with a missing value as float64, which rounds numbers
    from 2**53 on (1234567890123456789 becomes ...768): such a value is refused rather than
    used as some other number."""
    if math.isnan(number):
        raise RowError(f"{name} is NaN (not a number); leave the cell empty (null) for the default")
    if not number.is_integer():
        raise RowError(f"{name} must be a whole number, got {value!r}")
    if abs(number) >= EXACT_FLOAT:  # 2**53 itself may be a rounded 2**53 + 1
        raise RowError(
            f"{name} {value!r} is a float at or above 2**53, where floats skip whole numbers: it may have been rounded "
            "(pandas turns an integer column with a missing value into float64); store it as an integer or as text"
        )
    return int(number)


def id_text(value: Any) -> Optional[str]:
    """A row's id as text, or None when the cell is empty; RowError for an id that is not
    one (NaN, or a float that may have been rounded). Whole floats lose their ``.0``, so an
    id column that pandas made float64 gives the ids ``1``, ``2`` that CSV gives."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(whole_float(value, value, "id")) if value.is_integer() else repr(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def bounded_int(value: Any, name: str, default: int, low: int, high: int) -> int:
    if missing(value):
        return default
    number = whole(value, name)
    if not low <= number <= high:
        raise RowError(f"{name} must be between {low} and {high}, got {number}")
    return number


def size(value: Any, name: str, default: int, high: int, multiple: int, model: ModelEntry) -> int:
    """A width or height: within the limits, a multiple of ``limits.size_multiple`` and of
    what the row's model takes (off it FLUX would round the size down silently)."""
    number = bounded_int(value, name, default, 1, high)
    if number % multiple:
        raise RowError(f"{name} must be a multiple of {multiple}, got {number}")
    if number % model.size_multiple:
        raise RowError(f"{name} must be a multiple of {model.size_multiple} for model {model.name!r} ({model.size_rule}), got {number}")
    return number


def seed(value: Any, name: str) -> int | None:
    if missing(value):
        return None
    number = whole(value, name)
    if not 0 <= number < SEED_SPACE:
        raise RowError(f"{name} must be between 0 and 2**63-1, got {number}")
    return number


def number(value: Any, name: str, default: float, low: float, high: float) -> float:
    if missing(value):
        return default
    if isinstance(value, bool):
        raise RowError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RowError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise RowError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return number


def text(value: Any, name: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise RowError(f"{name} must be text, got {type(value).__name__} {value!r}")
    if len(value) > max_chars:
        raise RowError(f"{name} has {len(value)} characters, above limits.max_prompt_chars={max_chars}")
    bad = _CONTROL.search(value)
    if bad:
        raise RowError(f"{name} contains control character U+{ord(bad.group()):04X} at position {bad.start()}")
    return value


def prompt(value: Any, name: str, max_chars: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowError(f"{name} is missing (null)")
    checked = text(value, name, max_chars)
    if not checked.strip():
        raise RowError(f"{name} is empty")
    return checked


def optional_text(value: Any, name: str, default: str, max_chars: int) -> str:
    if missing(value):
        return default
    return text(value, name, max_chars)

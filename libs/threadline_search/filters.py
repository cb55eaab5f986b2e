"""Attribute filters of vector store search (ComparisonFilter / CompoundFilter), validated and evaluated.

Evaluated against the vector store files' `attributes` in the database (not in Qdrant), so updating a
file's attributes never has to touch its points.
"""

from collections.abc import Mapping
from typing import Any

_COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
_COMPOUNDS = ("and", "or")


class FilterError(ValueError):
    """An invalid filter (message and param for the 400)."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], param: str) -> None:
    """The contract's filters take no other keys (`additionalProperties: false`): a typo is not ignored."""
    for key in raw:
        if key not in allowed:
            raise FilterError(f"Unknown parameter: '{param}.{key}'.", f"{param}.{key}", "unknown_parameter")


def validate_filter(raw: object, param: str = "filters") -> None:
    """Raise FilterError unless `raw` is a well-formed comparison or compound filter."""
    if not isinstance(raw, Mapping):
        raise FilterError(f"Invalid type for '{param}': expected an object.", param, "invalid_type")
    kind = raw.get("type")
    if kind in _COMPOUNDS:
        _check_keys(raw, ("type", "filters"), param)
        filters = raw.get("filters")
        if not isinstance(filters, list) or not filters:
            raise FilterError(f"Invalid value for '{param}.filters': expected a non-empty array.", f"{param}.filters",
                              "invalid_value")
        for i, sub in enumerate(filters):
            validate_filter(sub, f"{param}.filters[{i}]")
        return
    if kind not in _COMPARISONS:
        raise FilterError(f"Invalid value for '{param}.type': expected one of "
                          f"{', '.join(repr(k) for k in _COMPARISONS + _COMPOUNDS)}.", f"{param}.type", "invalid_value")
    _check_keys(raw, ("type", "key", "value"), param)
    if not isinstance(raw.get("key"), str):
        raise FilterError(f"Missing required parameter: '{param}.key'.", f"{param}.key", "missing_required_parameter")
    if "value" not in raw:
        raise FilterError(f"Missing required parameter: '{param}.value'.", f"{param}.value",
                          "missing_required_parameter")
    value = raw["value"]
    if kind in ("in", "nin"):
        if not isinstance(value, list):
            raise FilterError(f"Invalid value for '{param}.value': '{kind}' expects an array.", f"{param}.value",
                              "invalid_value")
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise FilterError(f"Invalid type for '{param}.value[{index}]': expected a string or number.",
                                  f"{param}.value[{index}]", "invalid_type")
    elif not isinstance(value, str | int | float | bool):
        raise FilterError(f"Invalid type for '{param}.value': expected a string, number or boolean.",
                          f"{param}.value", "invalid_type")


def _equal(left: Any, right: Any) -> bool:
    """JSON equality: a boolean is not a number (Python has `True == 1`)."""
    return isinstance(left, bool) == isinstance(right, bool) and bool(left == right)


def _compare(kind: str, left: Any, right: Any) -> bool:
    if kind == "in":
        return any(_equal(left, item) for item in right)
    if kind == "nin":
        return not any(_equal(left, item) for item in right)
    if kind == "eq":
        return _equal(left, right)
    if kind == "ne":
        return not _equal(left, right)
    if isinstance(left, bool) or isinstance(right, bool):
        return False
    if isinstance(left, int | float) and isinstance(right, int | float):
        pass
    elif not (isinstance(left, str) and isinstance(right, str)):
        return False
    if kind == "gt":
        return bool(left > right)
    if kind == "gte":
        return bool(left >= right)
    if kind == "lt":
        return bool(left < right)
    return bool(left <= right)


def matches(raw: Mapping[str, Any], attributes: Mapping[str, Any] | None) -> bool:
    """Whether a file with these attributes passes the (validated) filter; a missing key never matches."""
    kind = raw["type"]
    if kind == "and":
        return all(matches(f, attributes) for f in raw["filters"])
    if kind == "or":
        return any(matches(f, attributes) for f in raw["filters"])
    attrs = attributes or {}
    if raw["key"] not in attrs:
        return kind in ("ne", "nin")
    return _compare(kind, attrs[raw["key"]], raw["value"])

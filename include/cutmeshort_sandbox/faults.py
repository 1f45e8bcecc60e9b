"""Fault settings of the sandbox: defaults, and checked merging of updates."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Every key a client may set. Absent keys keep their current value; the values below
# mean "no fault", apart from the two rate-limit settings, which emulate the vendor.
DEFAULT_FAULTS: dict[str, Any] = {
    "latency_ms": 0,
    "slow_rate": 0.0,
    "slow_ms": 0,
    "error_rate": 0.0,
    "error_status": 503,
    "reset_rate": 0.0,
    "burst_429": None,
    "fail_next": [],
    "permanent_errors": {},
    "revoked": False,
    "forbidden": False,
    "rate_limit_per_minute": 60,
    "retry_after_header": True,
    "seed": None,
    # Every answer quotes what it received, as a careless API does: the Authorization header,
    # the token percent-encoded, the body's e-mail and name in other letter cases, the address's
    # IDNA spelling; JSON written with every '/' escaped ('\\/'), as PHP's json_encode does.
    "echo": False,
}

# Keys for which an explicit null is meaningful rather than "back to the default".
_NULLABLE = {"burst_429", "rate_limit_per_minute", "seed"}


class FaultError(ValueError):
    """An update to the faults that cannot be applied."""


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, and `true` is never a sensible count or status.
    return isinstance(value, int) and not isinstance(value, bool)


def _non_negative_int(key: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise FaultError(f"{key} must be a non-negative integer")
    return int(value)


def _rate(key: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise FaultError(f"{key} must be a number between 0 and 1")
    return float(value)


def _error_status(key: str, value: Any) -> int:
    if not _is_int(value) or not 400 <= value <= 599:
        raise FaultError(f"{key} must be an HTTP error status (400-599)")
    return int(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FaultError(f"{key} must be true or false")
    return value


def _burst(key: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"count", "retry_after"}:
        raise FaultError(f'{key} must be {{"count": N, "retry_after": seconds or null}}')
    count = _non_negative_int(f"{key}.count", value.get("count", 0))
    retry_after = value.get("retry_after")
    if retry_after is not None:
        retry_after = _non_negative_int(f"{key}.retry_after", retry_after)
    return {"count": count, "retry_after": retry_after} if count else None


def _status_list(key: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise FaultError(f"{key} must be a list of HTTP statuses")
    return [_error_status(key, item) for item in value]


def _status_map(key: str, value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise FaultError(f"{key} must be an object of customerExternalId to HTTP status")
    return {str(customer): _error_status(key, status) for customer, status in value.items()}


def _optional_limit(key: str, value: Any) -> int | None:
    return None if value is None else _non_negative_int(key, value)


def _optional_seed(key: str, value: Any) -> int | None:
    if value is not None and not _is_int(value):
        raise FaultError(f"{key} must be an integer or null")
    return value


_CHECKS = {
    "latency_ms": _non_negative_int,
    "slow_rate": _rate,
    "slow_ms": _non_negative_int,
    "error_rate": _rate,
    "error_status": _error_status,
    "reset_rate": _rate,
    "burst_429": _burst,
    "fail_next": _status_list,
    "permanent_errors": _status_map,
    "revoked": _flag,
    "forbidden": _flag,
    "rate_limit_per_minute": _optional_limit,
    "retry_after_header": _flag,
    "seed": _optional_seed,
    "echo": _flag,
}


def merge_faults(current: Mapping[str, Any], update: Any) -> dict[str, Any]:
    """Return `current` with the keys of `update` applied; raise FaultError if invalid.

    The whole update is checked before anything changes, so a rejected update leaves
    the faults as they were. A null resets a key to its default.
    """
    if not isinstance(update, Mapping):
        raise FaultError("faults must be a JSON object")
    unknown = sorted(set(update) - set(_CHECKS))
    if unknown:
        raise FaultError(f"unknown fault keys: {', '.join(unknown)}")
    merged = copy.deepcopy(dict(current))
    for key, value in update.items():
        if value is None and key not in _NULLABLE:
            merged[key] = copy.deepcopy(DEFAULT_FAULTS[key])
        else:
            merged[key] = _CHECKS[key](key, value)
    return merged

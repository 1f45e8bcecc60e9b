"""Body rules of `POST /track/lead`, as strict as the vendor documents them."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

MAX_LENGTH = 255
REQUIRED_FIELDS = ("eventName", "customerExternalId")
KNOWN_FIELDS = frozenset(
    {
        "eventName",
        "customerExternalId",
        "clickId",
        "mode",
        "timestamp",
        "customerName",
        "customerEmail",
        "customerAvatar",
    }
)


@dataclass(frozen=True)
class Problem:
    """The first rule a body breaks: which field, and why."""

    field: str
    reason: str

    @property
    def message(self) -> str:
        return f"{self.field}: {self.reason}"


def _has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _is_aware_timestamp(text: str) -> bool:
    candidate = text[:-1] + "+00:00" if text.endswith("Z") else text
    try:
        parsed = datetime.fromisoformat(candidate)
    except ValueError:
        return False
    # A naive time is ambiguous: the vendor cannot know which zone the sender meant.
    return parsed.utcoffset() is not None


def _is_email(text: str) -> bool:
    if any(char.isspace() for char in text) or text.count("@") != 1:
        return False
    local, domain = text.split("@")
    labels = domain.split(".")
    return bool(local) and len(labels) >= 2 and all(labels)


def _is_web_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host)


def validate_lead(body: dict[str, Any]) -> Problem | None:
    """Return the first rule `body` breaks, or None when it is a valid lead event."""
    for field in body:
        if field not in KNOWN_FIELDS:
            return Problem(field, "unknown field")
    for field, value in body.items():
        if value is None:
            # The vendor wants absent values omitted; a null is a sender bug.
            return Problem(field, "must be omitted rather than null")
        if not isinstance(value, str):
            return Problem(field, "must be a string")
        if _has_control_character(value):
            return Problem(field, "must not contain control characters")

    for field in REQUIRED_FIELDS:
        if field not in body:
            return Problem(field, "is required")
    for field in (*REQUIRED_FIELDS, "clickId"):
        if field in body:
            if not body[field].strip():
                return Problem(field, "must not be empty")
            if len(body[field]) > MAX_LENGTH:
                return Problem(field, f"must be at most {MAX_LENGTH} characters")

    if "mode" in body:
        if body["mode"] != "deferred":
            return Problem("mode", 'must be "deferred" when present')
        if "clickId" not in body:
            return Problem("clickId", 'is required with mode "deferred"')
    if "timestamp" in body and not _is_aware_timestamp(body["timestamp"]):
        return Problem("timestamp", "must be ISO 8601 with a UTC offset or Z")
    if "customerEmail" in body and not _is_email(body["customerEmail"]):
        return Problem("customerEmail", "must be an email address")
    if "customerAvatar" in body and not _is_web_url(body["customerAvatar"]):
        return Problem("customerAvatar", "must be an http or https URL")
    if "customerName" in body and len(body["customerName"]) > MAX_LENGTH:
        return Problem("customerName", f"must be at most {MAX_LENGTH} characters")
    return None

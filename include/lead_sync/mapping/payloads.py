"""Keys and bodies of lead events: event keys, row keys, the body's JSON, its digest and redaction."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from lead_sync.mapping.values import MAX_TEXT


def event_key(customer_external_id: str, event_name: str) -> str:
    """Deterministic key: one lead event per customer and event name."""
    digest = hashlib.sha256(f"{customer_external_id}\x1f{event_name}".encode()).hexdigest()
    return f"ev_{digest[:40]}"


def _keyable(value: Any) -> Any:
    # json.dumps renders integers in decimal, which Python refuses beyond its digit limit.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 4 * MAX_TEXT:
        return f"int:{value:x}"
    return value


def row_key(source: str, row: dict) -> str:
    """Key of a row that cannot name its customer or event: its source and contents."""
    body = json.dumps({k: _keyable(v) for k, v in row.items()}, sort_keys=True, default=repr, ensure_ascii=True)
    digest = hashlib.sha256(f"{source}\x1f{body}".encode()).hexdigest()
    return f"row_{digest[:40]}"


# A payload of text values (every payload the mapping makes) is written here as json.dumps
# writes it, one value at a time with the json module's own string encoders; any other goes
# through json.dumps itself.
_DIGEST_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=True)  # json.dumps(sort_keys=True, ensure_ascii=True)
_BODY_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(ensure_ascii=False)
_ASCII_STRING = json.encoder.encode_basestring_ascii
_STRING = json.encoder.encode_basestring
_REDACTED = ("customerName", "customerEmail")


def _hash(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.strip().lower().encode()).hexdigest()


def redact(payload: dict | None) -> dict | None:
    """The payload as audited: names and emails replaced by their SHA-256."""
    if payload is None:
        return None
    out = dict(payload)
    for field in _REDACTED:
        if field in out:
            out[field] = _hash(out[field])
    return out


def payload_digest(payload: dict | None) -> str | None:
    """Fingerprint of the body as it would be sent: a change reopens a rejected event."""
    if payload is None:
        return None
    try:
        text = "{" + ", ".join([_ASCII_STRING(k) + ": " + _ASCII_STRING(payload[k]) for k in sorted(payload)]) + "}"
    except TypeError:  # a key or value that is not text
        text = _DIGEST_JSON.encode(payload)
    return hashlib.sha256(text.encode()).hexdigest()


def payload_json(payload: dict | None) -> tuple[str | None, str | None]:
    """The body to send and the body as audited (redact), each as json.dumps(..., ensure_ascii=False)."""
    if payload is None:
        return None, None
    sent, audited = [], []
    try:
        for key, value in payload.items():
            field = _STRING(key) + ": "
            sent.append(field + _STRING(value))
            audited.append(field + _STRING(_hash(value)) if key in _REDACTED else sent[-1])
    except TypeError:  # a key or value that is not text
        return _BODY_JSON.encode(payload), _BODY_JSON.encode(redact(payload))
    return "{" + ", ".join(sent) + "}", "{" + ", ".join(audited) + "}"

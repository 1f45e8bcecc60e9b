"""Masking secrets and customer values in text that reaches the audit, logs, alerts and pages.

An API answer may quote what it was sent: the token (raw, JSON-escaped, percent-encoded), a
customer's e-mail or name in another letter case, or an international address in its ASCII
(IDNA) spelling. Every spelling of each value is masked, case-insensitively; a JSON answer is
also decoded and masked string by string, so that no escape (`\\/`, `\\u00e9`) hides a value.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Iterable, Mapping
from urllib.parse import quote, quote_plus

# Shorter values would mask ordinary words of an answer.
MIN_CHARS = 3


def spellings(value: str, escapes: bool = True) -> set[str]:
    """The ways a value may be written back in text: as is, Unicode-normalised, an address with
    its IDNA domain; with `escapes`, also JSON-escaped (with and without `\\/` and `\\uXXXX`)
    and percent-encoded."""
    value = value.strip()
    if len(value) < MIN_CHARS:
        return set()
    bases = {value, unicodedata.normalize("NFC", value), unicodedata.normalize("NFD", value)}
    if "@" in value:
        local, _, domain = value.rpartition("@")
        try:
            bases.add(f"{local}@{domain.encode('idna').decode('ascii')}")
        except UnicodeError:
            pass
    forms = set(bases)
    if escapes:
        for base in bases:
            for escaped in (json.dumps(base)[1:-1], json.dumps(base, ensure_ascii=False)[1:-1]):
                forms |= {escaped, escaped.replace("/", "\\/")}
            forms |= {quote(base, safe=""), quote(base), quote_plus(base)}
    return {form for form in forms if len(form) >= MIN_CHARS}


def _pattern(forms: Iterable[str]) -> re.Pattern | None:
    ordered = sorted(set(forms), key=len, reverse=True)  # the longest spelling first
    return re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE) if ordered else None


class Scrubber:
    """Masks fixed secrets (the token) and, per call, the customer values of one request."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._fixed = [(label, _pattern(spellings(value))) for label, value in secrets.items() if value]

    def __call__(self, text: str | None, values: Iterable[tuple[str, str]] = ()) -> str | None:
        if not text:
            return text
        masks = [(label, pattern) for label, pattern in self._fixed if pattern is not None]
        # A customer value's escaped spellings only matter where the text has escapes; a value
        # that appears in no spelling costs no pattern.
        escapes = "%" in text or "\\" in text or "+" in text
        lowered = text.lower()
        for label, value in values:
            forms = spellings(value, escapes) if isinstance(value, str) else set()
            if any(form.lower() in lowered for form in forms):
                masks.append((label, _pattern(forms)))

        def mask(piece: str) -> str:
            for label, pattern in masks:
                piece = pattern.sub(f"[{label}]", piece)
            return piece

        masked = mask(text)
        if "\\" not in masked:  # no escape: the text says what its JSON decodes to
            return masked
        try:
            decoded = json.loads(masked)
        except ValueError:
            return masked
        if not isinstance(decoded, (dict, list)):
            return masked
        # Decoded, a value escaped in any way (\u00e9, \/) is in plain spelling: mask it again.
        return json.dumps(_walk(decoded, lambda piece: self(piece, values) if piece else piece), ensure_ascii=False)


def _walk(value, mask):
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {mask(k): _walk(v, mask) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, mask) for v in value]
    return value


def customer_values(payload: object, fields: Iterable[str]) -> list[tuple[str, str]]:
    """(field, value) of a request body's customer values to mask in its answer: each field's
    value, then the parts an answer may quote alone (a name's words, an address's local part)."""
    values: list[tuple[str, str]] = []
    if not isinstance(payload, dict):
        return values
    for field in fields:
        value = payload.get(field)
        if not isinstance(value, str) or len(value.strip()) < MIN_CHARS:
            continue
        values.append((field, value))
        parts = [value.rpartition("@")[0]] if "@" in value else value.split()
        values += [(field, part) for part in parts if len(part) >= MIN_CHARS and part != value.strip()]
    return values

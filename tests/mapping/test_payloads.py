"""Event keys, row keys, the body's JSON and digest, and redaction of names and emails."""
from __future__ import annotations

import hashlib
import json

from lead_sync.mapping.payloads import event_key, payload_digest, payload_json, redact, row_key
from tests.support.mapping import map_signups, one, plain, signup


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- keys ------------------------------------------------------------------------------

def test_event_key_is_deterministic():
    key = event_key("42", "signup_started")
    expected = "ev_" + hashlib.sha256("42\x1fsignup_started".encode()).hexdigest()[:40]
    assert key == expected == event_key("42", "signup_started")
    assert len(key) <= 64
    assert event_key("42", "email_verified") != key
    assert event_key("420", "signup_started") != key
    # The separator keeps (customer, name) pairs apart when concatenations agree.
    assert event_key("4", "2signup_started") != event_key("42", "signup_started")


def test_row_key_depends_on_source_and_contents():
    row = {"customer_external_id": None, "event_time": "x"}
    assert row_key("signups", row) == row_key("signups", dict(reversed(list(row.items()))))
    assert row_key("signups", row) != row_key("demo_bookings", row)
    assert row_key("signups", row) != row_key("signups", {**row, "click_id": "c"})
    assert row_key("signups", row).startswith("row_") and len(row_key("signups", row)) <= 64


def test_row_key_of_values_json_cannot_write():
    # Integers beyond Python's digit limit, and values of no JSON type, still key their row.
    huge = {"customer_external_id": 10**5000, "event_time": b"\x00"}
    assert row_key("signups", huge) == row_key("signups", dict(huge))
    assert row_key("signups", huge) != row_key("signups", {**huge, "customer_external_id": 10**5000 + 1})
    assert row_key("signups", huge) != row_key("signups", {**huge, "event_time": b"\x01"})


# --- redaction and digests -------------------------------------------------------------

def test_redact_hashes_name_and_email():
    payload = plain(customerName="Ann Smith", customerEmail="Ann.Smith@Example.com",
                    customerAvatar="https://img.cdn.test/a.png")
    original = dict(payload)
    redacted = redact(payload)
    assert redacted == plain(customerName=_sha("ann smith"), customerEmail=_sha("ann.smith@example.com"),
                             customerAvatar="https://img.cdn.test/a.png")
    assert payload == original  # not modified in place
    text = json.dumps(redacted)
    for raw in ("Ann", "ann", "Smith", "smith", "Example.com", "example.com"):
        assert raw not in text
    assert redact(None) is None
    assert redact(plain()) == plain()


def test_redacted_mapped_payload_keeps_nothing_raw():
    event = one(map_signups(signup(customer_name="Émilie Zola", customer_email="emilie.zola@example.fr")))
    text = json.dumps(redact(event.payload), ensure_ascii=False)
    assert "Émilie" not in text and "Zola" not in text and "emilie" not in text
    assert json.loads(text)["customerEmail"] == _sha("emilie.zola@example.fr")


def test_payload_digest():
    a = plain()
    assert payload_digest(a) == payload_digest(dict(reversed(list(a.items()))))  # key order does not matter
    assert payload_digest(a) == hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()
    assert payload_digest(a) != payload_digest(plain(customerName="Ann"))
    assert payload_digest(a) != payload_digest(plain(timestamp="2026-11-27T08:00:01Z"))
    assert payload_digest(a) != payload_digest(plain("43"))
    assert payload_digest(None) is None
    unicode = plain(customerName="Zoë 🦄")
    assert payload_digest(unicode) == hashlib.sha256(json.dumps(unicode, sort_keys=True).encode()).hexdigest()
    other = {"n": 1, "b": None}  # not text: written by json.dumps itself
    assert payload_digest(other) == hashlib.sha256(json.dumps(other, sort_keys=True).encode()).hexdigest()


def test_digest_follows_the_source_row():
    before = one(map_signups(signup(customer_email="ann@example.com")))
    same = one(map_signups(signup(customer_email="ann@example.com")))
    after = one(map_signups(signup(customer_email="ann@example.org")))
    assert payload_digest(before.payload) == payload_digest(same.payload) != payload_digest(after.payload)
    assert before.event_key == after.event_key


def test_payload_json_is_the_body_sent_and_the_body_audited():
    for payload in (plain(customerName="Zoë \"Z\" Ångström", customerEmail="zoe@example.org",
                          customerAvatar="https://x.example/🦄.png"), plain(), {"n": 1, "customerName": "Ann"}):
        sent, audited = payload_json(payload)
        assert sent == json.dumps(payload, ensure_ascii=False)
        assert audited == json.dumps(redact(payload), ensure_ascii=False)
    assert payload_json(None) == (None, None)

"""The API connection's extra settings: TLS keys refused at parse with the key named."""
from __future__ import annotations

import subprocess

import pytest

from lead_sync.delivery.client import InsecureEndpointError
from lead_sync.delivery.settings import ApiSettings, ApiTarget, parse_api_settings

from tests.support import TOKEN


def pem_pair(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=client",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def refused(extra: dict, key: str) -> str:
    with pytest.raises(ValueError) as caught:
        parse_api_settings(extra, "cme")
    message = str(caught.value)
    assert message.startswith(f"connection 'cme' has invalid extra settings: {key}")
    return message


def test_a_verify_path_that_does_not_exist_is_refused(tmp_path):
    assert "no CA bundle" in refused({"verify": str(tmp_path / "missing.pem")}, "verify")


def test_a_cert_without_its_key_is_refused(tmp_path):
    cert, key = pem_pair(tmp_path)
    assert "no private key" in refused({"cert": cert}, "cert")
    refused({"cert": [cert, str(tmp_path / "missing-key.pem")]}, "cert")
    assert parse_api_settings({"cert": [cert, key]}, "cme").cert == (cert, key)
    both = tmp_path / "both.pem"
    both.write_text(open(cert).read() + open(key).read())
    assert parse_api_settings({"cert": str(both)}, "cme").cert == str(both)


def test_verify_takes_a_bundle_or_false(tmp_path):
    cert, _ = pem_pair(tmp_path)
    assert parse_api_settings({"verify": cert}, "cme").verify == cert
    assert parse_api_settings({"verify": False}, "cme").verify is False
    assert parse_api_settings({}, "cme").verify is True


def test_verify_false_to_a_remote_host_is_refused_when_the_client_is_made():
    target = ApiTarget("https://api.cme.sh", TOKEN, ApiSettings(verify=False), "cme")
    with pytest.raises(InsecureEndpointError, match="connection 'cme': verify: false"):
        target.client()
    allowed = ApiTarget("https://api.cme.sh", TOKEN, ApiSettings(verify=False, allow_insecure_http=True), "cme")
    allowed.client().close()


@pytest.mark.parametrize("key, value", [("backoff_base_seconds", float("inf")), ("backoff_max_seconds", 1e12),
                                        ("rate_limit_per_minute", 10**12), ("timeout_seconds", float("inf"))])
def test_absurd_numbers_are_refused_with_the_key_named(key, value):
    assert "less than or equal" in refused({key: value}, key)

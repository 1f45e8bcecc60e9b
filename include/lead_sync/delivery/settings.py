"""Delivery settings read from the `cutmeshort_default` connection's extra."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lead_sync.delivery.client import CutMeShortClient
from lead_sync.delivery.retry import RetryPolicy


class ApiSettings(BaseModel):
    """Every key is optional; unknown keys are refused so that a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    rate_limit_per_minute: int = Field(default=60, ge=1, le=10_000_000)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_base_seconds: float = Field(default=1.0, ge=0, le=3600)
    backoff_max_seconds: float = Field(default=60.0, ge=0, le=3600)
    # Retried across runs for this long since the first attempt, then `failed` (final for automatic runs).
    give_up_after_hours: float = Field(default=72.0, gt=0, le=24 * 366)
    # Plain http to a non-loopback host, for a sandbox on a private network only.
    allow_insecure_http: bool = False
    # Requests a send task has on the wire at once. Unset: sized from the rate limit and the latency
    # measured so far (at most 32), starting with one request.
    max_in_flight: int | None = Field(default=None, ge=1, le=256)
    # TLS, as requests takes it: a CA bundle file (a private CA, a TLS-inspecting proxy), or false
    # for the sandbox only; unset, the environment's REQUESTS_CA_BUNDLE or certifi's bundle.
    verify: bool | str = True
    # A client certificate: one file holding the certificate and its key, or [certificate, key].
    cert: str | tuple[str, str] | None = None

    @field_validator("verify")
    @classmethod
    def _ca_bundle_exists(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not os.path.exists(value):
            raise ValueError(f"no CA bundle (file or folder) at {value!r}")
        return value

    @field_validator("cert")
    @classmethod
    def _cert_with_key(cls, value: str | tuple[str, str] | None) -> str | tuple[str, str] | None:
        if value is None:
            return value
        for path in (value,) if isinstance(value, str) else value:
            if not os.path.isfile(path):
                raise ValueError(f"no file at {path!r}")
        if isinstance(value, str):
            with open(value, "rb") as pem:
                if b"PRIVATE KEY-----" not in pem.read():
                    raise ValueError(f"{value!r} holds no private key: give [certificate, key] or one file "
                                     "with both")
        return value

    @field_validator("max_in_flight", mode="before")
    @classmethod
    def _not_a_flag(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true would otherwise count as 1
            raise ValueError("Input should be an integer from 1 to 256, not true or false")
        return value

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.backoff_base_seconds, self.backoff_max_seconds,
                           self.give_up_after_hours)


def parse_api_settings(extra: dict[str, Any] | None, connection_name: str) -> ApiSettings:
    try:
        return ApiSettings(**(extra or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"connection {connection_name!r} has invalid extra settings: {problems}") from None


@dataclass(frozen=True)
class ApiTarget:
    """Everything a sender needs to reach the API: where, with which token, under which settings."""

    base_url: str
    token: str = field(repr=False)
    settings: ApiSettings = field(default_factory=ApiSettings)
    connection_name: str = "cutmeshort_default"  # named in errors, e.g. when the token is refused

    def client(self) -> CutMeShortClient:
        s = self.settings
        try:
            return CutMeShortClient(self.base_url, self.token, s.timeout_seconds, s.allow_insecure_http,
                                    verify=s.verify, cert=s.cert)
        except ValueError as exc:
            raise type(exc)(f"connection {self.connection_name!r}: {exc}") from None

"""Delivery settings read from the `cutmeshort_default` connection's extra."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .retry import RetryPolicy


class ApiSettings(BaseModel):
    """Every key is optional; unknown keys are refused so that a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    rate_limit_per_minute: int = Field(default=60, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_base_seconds: float = Field(default=1.0, ge=0)
    backoff_max_seconds: float = Field(default=60.0, ge=0)
    # Plain http to a non-loopback host, for a sandbox on a private network only.
    allow_insecure_http: bool = False

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.backoff_base_seconds, self.backoff_max_seconds)


def parse_api_settings(extra: dict[str, Any] | None, connection_name: str) -> ApiSettings:
    try:
        return ApiSettings(**(extra or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"connection {connection_name!r} has invalid extra settings: {problems}") from None

"""Lead-source configuration: which SQL files feed which kind of lead event."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SOURCES_ENV = "LEAD_SYNC_SOURCES"
MAX_LOOKBACK_DAYS = 90
MAX_VERIFICATION_WAIT_DAYS = 365
MAX_TIME_BUDGET_SECONDS = 86_400
DEFAULT_SOURCES_FILE = Path(__file__).resolve().parents[2] / "sources" / "lead_sources.yaml"


class ConfigError(ValueError):
    """The lead-source configuration cannot be used."""


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    kind: Literal["signup", "verification"]
    sql: str
    event_name: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _event_name_for_signups(self) -> "SourceConfig":
        if self.kind == "signup" and not self.event_name:
            raise ValueError(f"source {self.name!r}: kind 'signup' needs an event_name")
        if self.kind == "verification" and self.event_name:
            raise ValueError(f"source {self.name!r}: a verification takes its event name from each row")
        return self


class AlertsConfig(BaseModel):
    """Who is told, and when: e-mail through `smtp_default`, Slack through a webhook connection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: tuple[str, ...] = ()
    slack_conn_id: str | None = Field(default=None, min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.-]+$")
    rejected_share: float = Field(default=0.05, ge=0, le=1)
    backlog_hours: float = Field(default=24, gt=0, le=24 * 366)

    @field_validator("email", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("email")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        checked = []
        for address in value:
            try:
                checked.append(validate_email(address, check_deliverability=False).normalized)
            except EmailNotValidError as exc:
                raise ValueError(f"{address!r} is not an e-mail address ({exc})") from None
        return tuple(checked)


class SyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    partition_timezone: str = "UTC"
    # How long an event 2 waits for its event 1; `le` also refuses .inf and .nan.
    verification_wait_days: float = Field(default=7, ge=0, le=MAX_VERIFICATION_WAIT_DAYS)
    # Days before the run's partition that are read again for rows loaded late.
    lookback_days: int = Field(default=3, ge=0, le=MAX_LOOKBACK_DAYS, strict=True)
    # lead_events_drain sends what is open every so many minutes (section 8: within 5).
    drain_interval_minutes: int = Field(default=5, ge=1, le=5, strict=True)
    # Sending is spread over mapped tasks of at most this many events each (a run of a few
    # events is one task), and at most `max_send_batches` of them per run.
    send_batch_size: int = Field(default=500, ge=1, le=100_000, strict=True)
    max_send_batches: int = Field(default=16, ge=1, le=1024, strict=True)
    # No section: no alerts, and nothing fails for it.
    alerts: AlertsConfig | None = None
    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    base_dir: Path = Path(".")

    @field_validator("partition_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> "SyncConfig":
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError("source names must be unique")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.partition_timezone)

    def sql_text(self, source: SourceConfig) -> str:
        path = (self.base_dir / source.sql).resolve()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"source {source.name!r}: cannot read SQL file {path}: {exc}") from exc


def check_time_budget(value: object) -> float:
    """A run's `time_budget_seconds` (a number or its text, as a template renders it) as seconds."""
    seconds = math.nan
    if not isinstance(value, bool):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            pass
    if not 0 < seconds <= MAX_TIME_BUDGET_SECONDS:  # also false for nan
        raise ConfigError(f"time_budget_seconds must be a number of seconds above 0 and at most "
                          f"{MAX_TIME_BUDGET_SECONDS} (24 hours), got {value!r}")
    return seconds


def describe_errors(exc: ValidationError) -> str:
    """One line per problem, each naming its key (e.g. `alerts.email.0: ...`)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'configuration'}: {e['msg']}" for e in exc.errors())


def sources_file() -> Path:
    """The configuration in use: $LEAD_SYNC_SOURCES, else the bundled default."""
    return Path(os.environ.get(SOURCES_ENV) or DEFAULT_SOURCES_FILE)


def load_config(path: Path | str | None = None) -> SyncConfig:
    path = Path(path) if path else sources_file()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read lead-source configuration {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = SyncConfig(**raw, base_dir=path.resolve().parent)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from None
    for source in config.sources:
        config.sql_text(source)  # fail at load time, not mid-run
    return config

"""Lead-source configuration: which SQL files feed which kind of lead event."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SOURCES_ENV = "LEAD_SYNC_SOURCES"
DEFAULT_SOURCES_FILE = Path(__file__).resolve().parent.parent / "sources" / "lead_sources.yaml"


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


class SyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    partition_timezone: str = "UTC"
    verification_wait_days: float = Field(default=7, ge=0)
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
        raise ConfigError(f"{path}: {exc}") from exc
    for source in config.sources:
        config.sql_text(source)  # fail at load time, not mid-run
    return config

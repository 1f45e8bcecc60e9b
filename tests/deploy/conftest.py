"""Fixtures of the deployment files' tests: compose's parser and the configuration it resolves."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import apt_install
from tests.support.compose import SECRETS, resolved_config


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """Debian's docker-compose: only the compose parser, not the Docker engine it recommends."""
    return apt_install("docker-compose", "docker-compose", no_recommends=True)


@pytest.fixture(scope="session")
def empty_env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="session")
def config(docker_compose, empty_env_file) -> dict:
    return resolved_config(docker_compose, SECRETS, empty_env_file)


@pytest.fixture(scope="session")
def services(config) -> dict:
    return config["services"]

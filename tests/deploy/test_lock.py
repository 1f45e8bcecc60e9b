"""requirements.lock is what runs: the environment of these tests matches it and is consistent.

The Docker image installs the same lock with ``--no-deps`` (no second resolution), so a lock that
drifts from the direct pins, or that does not install into a consistent environment, is caught
here before an image is built.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO / "requirements.lock"
DIRECT_FILES = (REPO / "requirements.txt", REPO / "requirements-dev.txt")

# Newer celery (5.7.0, which apache-airflow-providers-celery allows) breaks the CeleryExecutor:
# "cannot import name 'retry' from 'celery.backends.database'".
CELERY = "5.6.3"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a requirements file (markers applied)."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{path.name}: {raw!r} is not an exact pin"
        found[normalise(requirement.name)] = specifiers[0].version
    return found


@pytest.fixture(scope="module")
def locked() -> dict[str, str]:
    return pins(LOCK_FILE)


def installed_versions() -> dict[str, str]:
    return {normalise(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}


def test_lock_pins_the_celery_stack(locked):
    assert "apache-airflow-providers-celery" in locked
    assert locked["celery"] == CELERY
    assert "redis" in locked, "the Celery broker is Redis: its client must be locked"
    assert "kombu" in locked


def test_lock_agrees_with_direct_pins(locked):
    """A pin changed in requirements.txt / requirements-dev.txt without recompiling the lock."""
    for path in DIRECT_FILES:
        for name, version in pins(path).items():
            assert name in locked, f"{name} ({path.name}) is missing from requirements.lock: recompile it"
            assert Version(locked[name]) == Version(version), (
                f"{name}: {path.name} pins {version}, requirements.lock {locked[name]}: recompile the lock")


def test_environment_matches_lock(locked):
    installed = installed_versions()
    missing = sorted(name for name in locked if name not in installed)
    wrong = sorted(f"{name} {installed[name]} (lock: {version})" for name, version in locked.items()
                   if name in installed and Version(installed[name]) != Version(version))
    assert not missing and not wrong, (
        f"the environment differs from requirements.lock (run make install): "
        f"missing {missing}, other versions {wrong}")


def test_environment_is_consistent():
    """pip check: every installed package's own requirements are met."""
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    if pip.returncode == 0:
        command = [sys.executable, "-m", "pip", "check"]
    else:
        uv = Path(sys.executable).with_name("uv")
        uv_path = str(uv) if uv.exists() else shutil.which("uv")
        if not uv_path:
            pytest.fail(f"neither pip nor uv is available to check the environment of {sys.executable}")
        command = [uv_path, "pip", "check", "--python", sys.executable]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`{' '.join(command)}` failed:\n{done.stdout}{done.stderr}"



def test_locked_celery_stack_loads_the_executor(tmp_path):
    """The executor docker-compose.yaml runs loads with the locked celery, kombu and redis."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    code = ("import celery, redis, airflow.providers.celery.executors.celery_executor as executor; "
            "assert executor.CeleryExecutor; print(celery.__version__)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the CeleryExecutor does not load:\n{done.stderr[-3000:]}"
    assert done.stdout.strip().splitlines()[-1] == CELERY

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

CELERY_PROVIDER = "apache-airflow-providers-celery"  # the CeleryExecutor docker-compose.yaml runs


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


def requirements_of(name: str, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """What an installed package requires here (this platform and Python), with those of `extras`."""
    found = []
    for raw in importlib.metadata.requires(name) or []:
        requirement = Requirement(raw)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            found.append(requirement)
    return found


def test_lock_pins_the_celery_the_provider_needs(locked):
    """The locked Celery satisfies the locked provider's requirement, and so does everything Celery
    needs in turn, the Redis client of its broker included (celery[redis]); the requirements are
    read from the installed packages' metadata, which is the lock's (test_environment_matches_lock)."""
    assert CELERY_PROVIDER in locked
    assert Version(importlib.metadata.version(CELERY_PROVIDER)) == Version(locked[CELERY_PROVIDER])
    (celery,) = [r for r in requirements_of(CELERY_PROVIDER) if normalise(r.name) == "celery"]
    assert "redis" in celery.extras, "the Celery broker is Redis: the provider must bring its client"
    unmet, seen, todo = [], set(), [celery]
    while todo:
        requirement = todo.pop()
        name = normalise(requirement.name)
        if name not in locked:
            unmet.append(f"{requirement}: not in requirements.lock")
            continue
        if not requirement.specifier.contains(locked[name], prereleases=True):
            unmet.append(f"{requirement}: requirements.lock has {locked[name]}")
            continue
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        assert Version(importlib.metadata.version(name)) == Version(locked[name]), f"{name}: run make install"
        todo.extend(requirements_of(name, frozenset(requirement.extras)))
    assert not unmet, unmet
    assert {"celery", "kombu", "redis"} <= {name for name, _ in seen}


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


def test_locked_celery_stack_loads_the_executor(tmp_path, locked):
    """The executor docker-compose.yaml runs loads with the locked celery, kombu and redis. Not every
    Celery the provider allows does: with 5.7.0, "cannot import name 'retry' from
    'celery.backends.database'"."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    code = ("import celery, redis, airflow.providers.celery.executors.celery_executor as executor; "
            "assert executor.CeleryExecutor; print(celery.__version__)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the CeleryExecutor does not load:\n{done.stderr[-3000:]}"
    assert Version(done.stdout.strip().splitlines()[-1]) == Version(locked["celery"])

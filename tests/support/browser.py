"""Headless Chromium, to look at a page as a person would (a pytest plugin: tests/conftest.py registers it)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here when missing (the machine is root, Debian's registry is reachable)."""
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(binary).exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    if not Path(binary).exists():
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver")
    return binary


def headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with a profile of its own (e.g. --screenshot, --dump-dom)."""
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=90)

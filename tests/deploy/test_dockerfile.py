"""The Dockerfile and its build context: the locked Airflow image, the lock installed as it is,
nothing copied that the context keeps out (secrets, the virtualenv)."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import PurePosixPath

from tests.support import ROOT
from tests.support.compose import dockerfile_instructions, dockerignore, locked_version


def test_dockerfile_base_image_matches_lock():
    froms = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[\d.]+)-python(?P<python>\d+\.\d+)", froms[0])
    assert match, f"unexpected base image {froms[0]}"
    assert match.group("airflow") == locked_version("apache-airflow")
    assert match.group("python") == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_dockerfile_installs_the_lock_without_resolving():
    instructions = dockerfile_instructions()
    installs = [i for i, (op, arg) in enumerate(instructions) if op == "RUN" and "pip install" in arg]
    assert len(installs) == 1, "one install step, from the lock"
    index = installs[0]
    command = shlex.split(instructions[index][1])
    assert "--no-deps" in command, "with dependencies, pip would resolve versions the lock does not name"
    requirement_files = [command[i + 1] for i, part in enumerate(command) if part == "-r"]
    assert [PurePosixPath(f).name for f in requirement_files] == ["requirements.lock"]
    assert "-c" not in command and "requirements.txt" not in instructions[index][1]
    assert "--no-cache-dir" in command

    users = [arg for op, arg in instructions[:index] if op == "USER"]
    assert users and users[-1] == "airflow", "the official image installs extra packages as airflow"
    copied = [arg for op, arg in instructions[:index] if op == "COPY"]
    assert any("requirements.lock" in arg for arg in copied)


def test_dockerfile_copies_only_what_the_context_allows():
    lines = dockerignore()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for op, arg in dockerfile_instructions():
        if op != "COPY":
            continue
        sources = [part for part in shlex.split(arg) if not part.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: not in the .dockerignore allowlist"
            assert (ROOT / source).exists(), f"COPY {source}: missing from the checkout"


def test_dockerignore_keeps_secrets_and_venv_out():
    lines = dockerignore()
    assert lines[0] == "*", "the build context is an allowlist"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"requirements.lock", "dags", "plugins", "include"} <= allowed
    assert not allowed & {".env", ".venv", "logs", "config", ".git"}
    # .env excluded after the allowlist, so that no later "!" line can bring it in by accident.
    last_env_rule = [line for line in lines if line.lstrip("!").endswith(".env")][-1]
    assert not last_env_rule.startswith("!")


def test_env_is_ignored_by_git():
    ignored = {line.strip().lstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored, ".env (make compose-env) holds secrets: list it in .gitignore"

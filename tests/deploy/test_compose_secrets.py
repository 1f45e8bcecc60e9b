"""docker-compose.yaml's secrets: every one required, none written in the file, as the README lists
them; and scripts/compose_env.py, which writes them to .env."""
from __future__ import annotations

import base64
import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import ROOT
from tests.support.compose import (
    AIRFLOW_DAEMONS, COMPOSE_ENV_SCRIPT, README_COMPOSE, REFERENCE, REFERENCES, SANDBOX, SECRET_NAME,
    SECRET_VARIABLES, SECRETS, env_of, resolved_config, run_compose, running,
)


def test_compose_file_is_valid(docker_compose, empty_env_file):
    done = run_compose(docker_compose, "config", "-q", variables=SECRETS, env_file=empty_env_file)
    assert done.returncode == 0, f"docker-compose config -q failed:\n{done.stderr}"
    # Every variable the file reads is either required or has a default.
    assert "is not set" not in done.stderr, done.stderr


def test_the_readme_lists_the_secrets_the_file_reads():
    """What a user must set, as the README says it: exactly the secrets the file reads."""
    assert SECRET_VARIABLES, "docker-compose.yaml reads no secret from the environment"
    sentence = re.search(r"The file gives no secret a default:(.*?)are\s+required", README_COMPOSE, re.DOTALL)
    assert sentence, "the README's compose section does not list the required secrets"
    assert set(re.findall(r"`(\w+)`", sentence.group(1))) == set(SECRET_VARIABLES)


def test_no_default_for_secret_variables():
    offenders = sorted({f"${{{name}{op}{arg}}}" for name, op, arg in REFERENCES
                        if SECRET_NAME.search(name) and (op or "").lstrip(":") != "?"})
    assert not offenders, f"secrets must be required (${{NAME:?how to set it}}), not defaulted: {offenders}"
    silent = sorted({name for name, op, arg in REFERENCES if SECRET_NAME.search(name) and not arg.strip()})
    assert not silent, f"say how to set these when they are missing: {silent}"


def missing_variable_message(stderr: str) -> str:
    # Compose v1 quotes the offending mapping with the file's own ${...} text; drop that text, so
    # that what is left is compose's message and the one the file gives for the missing variable.
    return REFERENCE.sub("", stderr)


def test_config_without_secrets_fails(docker_compose, empty_env_file):
    done = run_compose(docker_compose, "config", "-q", variables={}, env_file=empty_env_file)
    assert done.returncode != 0, "docker-compose config passed with no secret set"
    message = missing_variable_message(done.stderr)
    named = [name for name in SECRET_VARIABLES if re.search(rf"\b{name}\b", message)]
    assert named, f"the error names no missing variable:\n{done.stderr}"


@pytest.mark.parametrize("missing", SECRET_VARIABLES)
def test_each_secret_is_required(docker_compose, empty_env_file, missing):
    variables = {name: value for name, value in SECRETS.items() if name != missing}
    done = run_compose(docker_compose, "config", "-q", variables=variables, env_file=empty_env_file)
    assert done.returncode != 0, f"docker-compose config passed without {missing}"
    assert re.search(rf"\b{missing}\b", missing_variable_message(done.stderr)), (
        f"the error does not name {missing}:\n{done.stderr}")


def test_no_secret_is_written_in_the_file(services):
    """Every password, token and key a service receives is one of the variables' values."""
    given = set(SECRETS.values())
    problems = []
    for name, service in services.items():
        for key, value in env_of(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE") and value not in given:
                problems.append(f"{name}: {key}")
            if "://" in value:
                password = urlsplit(value).password
                if password and password not in given:
                    problems.append(f"{name}: {key} (URL password)")
            if value.startswith("{"):
                secret = json.loads(value).get("password")
                if secret and secret not in given:
                    problems.append(f"{name}: {key} (connection password)")
    assert not problems, f"secrets written in docker-compose.yaml: {problems}"


def run_compose_env(env_file: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(COMPOSE_ENV_SCRIPT), "--env-file", str(env_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def env_file_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_compose_env_writes_a_working_env(docker_compose, tmp_path):
    env_file = tmp_path / ".env"
    first = run_compose_env(env_file)
    values = env_file_values(env_file)
    assert set(SECRET_VARIABLES) <= set(values)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600, ".env holds passwords: owner only"
    for name in SECRET_VARIABLES:
        assert values[name] not in first.stdout + first.stderr, "the script must not print the secrets"

    done = run_compose(docker_compose, "config", "-q", variables={}, env_file=env_file)
    assert done.returncode == 0, f"docker-compose config with the generated .env failed:\n{done.stderr}"
    config = resolved_config(docker_compose, {}, env_file)
    env = env_of(running(config["services"], "scheduler"))
    assert len(base64.urlsafe_b64decode(env["AIRFLOW__CORE__FERNET_KEY"])) == 32, "not a Fernet key"
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32

    # Rerun: nothing changes, the Fernet key above stays the one of the metadata database.
    before = env_file.read_text()
    run_compose_env(env_file)
    assert env_file.read_text() == before

    other = tmp_path / "other.env"
    run_compose_env(other)
    fresh = env_file_values(other)
    assert fresh.keys() == values.keys()
    assert all(fresh[name] != values[name] for name in SECRET_VARIABLES), "every run makes new secrets"


def test_compose_env_keeps_what_env_already_sets(docker_compose, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("AIRFLOW_UID=4242\nCUTMESHORT_TOKEN=my-own-token")  # no final newline
    run_compose_env(env_file)
    values = env_file_values(env_file)
    assert values["AIRFLOW_UID"] == "4242" and values["CUTMESHORT_TOKEN"] == "my-own-token"
    services = resolved_config(docker_compose, {}, env_file)["services"]
    assert env_of(services[SANDBOX])["CUTMESHORT_SANDBOX_TOKEN"] == "my-own-token"
    assert all(services[name]["user"] == "4242:0" for name in AIRFLOW_DAEMONS)


def test_make_compose_env_runs_the_script():
    done = subprocess.run(["make", "-n", "compose-env"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "scripts/compose_env.py" in done.stdout

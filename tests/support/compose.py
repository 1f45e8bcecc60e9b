"""docker-compose.yaml as compose itself reads it, the Dockerfile and the files they reference.

There is no Docker engine where the suite runs, so nothing is started: ``docker-compose config``
(Debian's docker-compose, installed here when missing) validates the file, applies anchors,
merges and ``${VAR}`` interpolation, and prints the resolved configuration the checks inspect.
Compose runs with every variable the file reads removed from its environment and an empty
``--env-file``, so a developer's shell or .env cannot change the outcome; the required secrets
are given distinct test values, which lets the checks trace where each one ends up.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import yaml

from tests.support import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
LOCK_FILE = ROOT / "requirements.lock"
COMPOSE_ENV_SCRIPT = ROOT / "scripts" / "compose_env.py"
COMPOSE_TEXT = COMPOSE_FILE.read_text()
HEADER = "\n".join(line for line in COMPOSE_TEXT.split("\n---", 1)[0].splitlines() if line.startswith("#"))
README = (ROOT / "README.md").read_text()
README_COMPOSE = README.split("\n## Docker Compose\n", 1)[1].split("\n## ", 1)[0]

# Airflow 3's components, each run by a command of its own, and the worker each executor needs.
COMPONENT_COMMANDS = {"api-server", "scheduler", "dag-processor", "triggerer"}
WORKER_COMMANDS = {"CeleryExecutor": "celery worker"}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}

# ${NAME}, ${NAME:-default}, ${NAME:?message}, ... but not $${NAME}, which compose leaves to the shell.
REFERENCE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|KEY")

REFERENCES = [(m.group("name"), m.group("op"), m.group("arg")) for m in REFERENCE.finditer(COMPOSE_TEXT)]
REFERENCED = sorted({name for name, _, _ in REFERENCES})
SECRET_VARIABLES = sorted(name for name in REFERENCED if SECRET_NAME.search(name))


def argv(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value or []]


def airflow_service_names() -> list[str]:
    """The services built on x-airflow-common (`<<: *airflow-common`), as the file's own nodes say."""
    top = {key.value: value for key, value in yaml.compose(COMPOSE_TEXT).value}
    common = top["x-airflow-common"]
    names = []
    for name, node in top["services"].value:
        merged = [value for key, value in node.value if key.value == "<<"]
        bases = [base for value in merged
                 for base in (value.value if isinstance(value, yaml.SequenceNode) else [value])]
        if any(base is common for base in bases):
            names.append(name.value)
    return names


# Roles, found by what each service does, so that every rule below names no service itself.
_FILE_SERVICES = yaml.safe_load(COMPOSE_TEXT)["services"]
_COMMANDS = {name: " ".join(argv(service.get("command"))) for name, service in _FILE_SERVICES.items()}
AIRFLOW_SERVICES = airflow_service_names()
AIRFLOW_DAEMONS = [name for name in AIRFLOW_SERVICES
                   if _COMMANDS[name] in COMPONENT_COMMANDS | set(WORKER_COMMANDS.values())]
(INIT,) = [name for name in AIRFLOW_SERVICES if "airflow db migrate" in _COMMANDS[name]]
(SANDBOX,) = [name for name, command in _COMMANDS.items() if command.startswith("python -m cutmeshort_sandbox")]
# Services others wait for to be healthy, and those kept running: each must say when it is healthy.
WAITED_FOR = sorted({name for service in _FILE_SERVICES.values()
                     for name, need in (service.get("depends_on") or {}).items()
                     if isinstance(need, dict) and need.get("condition") == "service_healthy"})
KEPT_RUNNING = sorted(name for name, service in _FILE_SERVICES.items() if service.get("restart") == "always")


def sample_value(name: str) -> str:
    if "FERNET" in name:
        return base64.urlsafe_b64encode(name.encode().ljust(32, b"x")[:32]).decode()
    return f"test-{name.lower().replace('_', '-')}-value"


SECRETS = {name: sample_value(name) for name in SECRET_VARIABLES}


def run_compose(binary: str, *args: str, variables: dict[str, str], env_file: Path) -> subprocess.CompletedProcess:
    """docker-compose -f docker-compose.yaml --env-file ENV_FILE ARGS, with only ``variables`` set
    of the variables the file reads."""
    env = {k: v for k, v in os.environ.items() if k not in REFERENCED and not k.startswith("COMPOSE_")}
    env.update(variables)
    command = [binary, "--file", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def resolved_config(binary: str, variables: dict[str, str], env_file: Path) -> dict:
    done = run_compose(binary, "config", variables=variables, env_file=env_file)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of every volume of a resolved service."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((str(volume.get("source", "")), volume["target"], bool(volume.get("read_only"))))
            continue
        parts = volume.split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        found.append((parts[0], parts[1], "ro" in mode.split(",")))
    return found


def bind_mounts(service: dict) -> dict[str, tuple[Path, bool]]:
    """Container path -> (host path, read-only), for the service's bind mounts."""
    return {target: (Path(source), read_only) for source, target, read_only in volumes(service)
            if source.startswith("/")}


def published_ports(service: dict) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) of every port the service publishes."""
    found = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.add((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        host_port = int(parts[-2]) if len(parts) >= 2 else 0
        found.add((host_ip, host_port, int(parts[-1])))
    return found


def container_ports(service: dict) -> set[int]:
    return {c for _, _, c in published_ports(service)} | {int(str(p).split("/")[0]) for p in service.get("expose", [])}


def running(services: dict, command: str) -> dict:
    """The one service that runs `command` (an Airflow component, or the executor's worker)."""
    found = [service for service in services.values() if " ".join(argv(service.get("command"))) == command]
    assert len(found) == 1, f"{len(found)} services run {command!r}"
    return found[0]


def worker(services: dict) -> dict:
    """The service that runs the tasks: the worker of the executor the stack runs."""
    return running(services, WORKER_COMMANDS[env_of(running(services, "scheduler"))["AIRFLOW__CORE__EXECUTOR"]])


def connection(services: dict, conn_id: str) -> dict:
    """An Airflow connection as the tasks get it: from the worker's environment."""
    raw = env_of(worker(services))[f"AIRFLOW_CONN_{conn_id.upper()}"]
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value


def locked_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)\s*$", LOCK_FILE.read_text(), re.MULTILINE)
    assert match, f"{package} is not pinned in requirements.lock"
    return match.group(1)


def container_to_host(service: dict, container_path: str) -> Path:
    """The checkout's file behind a path inside a container, through the service's bind mounts."""
    path = PurePosixPath(container_path)
    for target, (source, _) in bind_mounts(service).items():
        try:
            relative = path.relative_to(target)
        except ValueError:
            continue
        return source / relative
    raise AssertionError(f"{container_path} is not under any bind mount")


def service_of_host(services: dict, host: str) -> dict:
    assert host in services, f"{host} is not a service of docker-compose.yaml"
    return services[host]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def baked_in_code() -> dict[str, str]:
    """Container folder -> checkout folder, for each folder of code the Dockerfile copies into the image."""
    found = {}
    for op, arg in dockerfile_instructions():
        parts = [part for part in shlex.split(arg) if not part.startswith("--")] if op == "COPY" else []
        if len(parts) == 2 and (ROOT / parts[0]).is_dir():
            found[parts[1].rstrip("/")] = parts[0].rstrip("/")
    return found

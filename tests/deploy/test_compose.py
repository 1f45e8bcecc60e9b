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
import importlib.metadata
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support import apt_install

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
LOCK_FILE = REPO / "requirements.lock"
COMPOSE_ENV_SCRIPT = REPO / "scripts" / "compose_env.py"
COMPOSE_TEXT = COMPOSE_FILE.read_text()

AIRFLOW_DAEMONS = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
)
AIRFLOW_SERVICES = AIRFLOW_DAEMONS + ("airflow-init", "airflow-cli")
OTHER_SERVICES = ("postgres", "redis", "warehouse", "sandbox")
# Airflow 3's components, each run by one daemon: the command it runs.
COMPONENT_COMMANDS = {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"}

CODE_MOUNTS = {"/opt/airflow/dags": "dags", "/opt/airflow/plugins": "plugins", "/opt/airflow/include": "include"}
POOL_NAME = "cutmeshort_api"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}

# ${NAME}, ${NAME:-default}, ${NAME:?message}, ... but not $${NAME}, which compose leaves to the shell.
_REFERENCE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|KEY")

REFERENCES = [(m.group("name"), m.group("op"), m.group("arg")) for m in _REFERENCE.finditer(COMPOSE_TEXT)]
REFERENCED = sorted({name for name, _, _ in REFERENCES})
SECRET_VARIABLES = sorted(name for name in REFERENCED if _SECRET_NAME.search(name))


def sample_value(name: str) -> str:
    if "FERNET" in name:
        return base64.urlsafe_b64encode(name.encode().ljust(32, b"x")[:32]).decode()
    return f"test-{name.lower().replace('_', '-')}-value"


SECRETS = {name: sample_value(name) for name in SECRET_VARIABLES}


# --------------------------------------------------------------------------- running compose


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """Debian's docker-compose: only the compose parser, not the Docker engine it recommends."""
    return apt_install("docker-compose", "docker-compose", no_recommends=True)


@pytest.fixture(scope="session")
def empty_env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


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


@pytest.fixture(scope="module")
def config(docker_compose, empty_env_file) -> dict:
    return resolved_config(docker_compose, SECRETS, empty_env_file)


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def argv(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value or []]


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


def connection(services: dict, conn_id: str) -> dict:
    raw = env_of(services["airflow-worker"])[f"AIRFLOW_CONN_{conn_id.upper()}"]
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


# --------------------------------------------------------------------------- validity and secrets


def test_compose_file_is_valid(docker_compose, empty_env_file):
    done = run_compose(docker_compose, "config", "-q", variables=SECRETS, env_file=empty_env_file)
    assert done.returncode == 0, f"docker-compose config -q failed:\n{done.stderr}"
    # Every variable the file reads is either required or has a default.
    assert "is not set" not in done.stderr, done.stderr


def test_secrets_are_required():
    assert SECRET_VARIABLES, "docker-compose.yaml reads no secret from the environment"
    # Each secret the stack uses comes from a variable: none is written in the file.
    assert {"AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_UI_PASSWORD", "CUTMESHORT_TOKEN"} <= set(SECRET_VARIABLES)


def test_no_default_for_secret_variables():
    offenders = sorted({f"${{{name}{op}{arg}}}" for name, op, arg in REFERENCES
                        if _SECRET_NAME.search(name) and (op or "").lstrip(":") != "?"})
    assert not offenders, f"secrets must be required (${{NAME:?how to set it}}), not defaulted: {offenders}"
    silent = sorted({name for name, op, arg in REFERENCES if _SECRET_NAME.search(name) and not arg.strip()})
    assert not silent, f"say how to set these when they are missing: {silent}"


def missing_variable_message(stderr: str) -> str:
    # Compose v1 quotes the offending mapping with the file's own ${...} text; drop that text, so
    # that what is left is compose's message and the one the file gives for the missing variable.
    return _REFERENCE.sub("", stderr)


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
            if _SECRET_NAME.search(key) and not key.endswith("_FILE") and value not in given:
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
    env = env_of(config["services"]["airflow-scheduler"])
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
    assert env_of(services["sandbox"])["CUTMESHORT_SANDBOX_TOKEN"] == "my-own-token"
    assert services["airflow-worker"]["user"] == "4242:0"


def test_make_compose_env_runs_the_script():
    done = subprocess.run(["make", "-n", "compose-env"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "scripts/compose_env.py" in done.stdout


# --------------------------------------------------------------------------- services


def test_all_services_defined(services):
    missing = set(AIRFLOW_SERVICES + OTHER_SERVICES) - set(services)
    assert not missing, f"services missing from docker-compose.yaml: {sorted(missing)}"


def test_named_volumes_declared(config, services):
    declared = set(config.get("volumes") or {})
    for name in ("postgres", "warehouse"):
        data = {source: target for source, target, _ in volumes(services[name])}
        named = [source for source, target in data.items() if target == "/var/lib/postgresql/data"]
        assert named and named[0] in declared, f"{name}: its data must live in a declared named volume"


@pytest.mark.parametrize("name", AIRFLOW_SERVICES + ("sandbox",))
def test_service_runs_the_project_image(services, name):
    service = services[name]
    build = service.get("build")
    context = build.get("context") if isinstance(build, dict) else build
    assert Path(context) == REPO, f"{name} is not built from this checkout"
    assert (Path(context) / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file()
    assert service["image"] == services["airflow-apiserver"]["image"], f"{name} runs another image"


def test_image_tag_follows_locked_airflow_version(services):
    assert services["airflow-apiserver"]["image"].rsplit(":", 1)[-1] == locked_version("apache-airflow")


def test_common_environment_reaches_every_airflow_service(services):
    """A service that overrides "environment" without merging x-airflow-common loses it all."""
    common_keys = yaml.safe_load(COMPOSE_TEXT)["x-airflow-common"]["environment"].keys()
    problems = []
    for key in common_keys:
        values = {name: env_of(services[name]).get(key) for name in AIRFLOW_SERVICES}
        missing = sorted(name for name, value in values.items() if value is None)
        if missing:
            problems.append(f"{key} missing from {missing}")
        elif len(set(values.values())) != 1:
            problems.append(f"{key} differs between services: {values}")
    assert not problems, problems


def test_executor_is_celery_with_redis_broker(services):
    env = env_of(services["airflow-scheduler"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis"
    redis = service_of_host(services, broker.hostname)
    assert redis["image"].split(":")[0] == "redis"
    assert (broker.port or 6379) in container_ports(redis)
    assert redis["healthcheck"]["test"]


@pytest.mark.parametrize("key", ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"])
def test_metadata_urls_match_postgres_service(services, key):
    url = urlsplit(env_of(services["airflow-scheduler"])[key])
    assert url.scheme in {"postgresql+psycopg2", "db+postgresql"}
    postgres = env_of(service_of_host(services, url.hostname))
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"] == SECRETS["AIRFLOW_DB_PASSWORD"]
    assert url.path.lstrip("/") == postgres["POSTGRES_DB"]


def test_airflow_settings(services):
    env = env_of(services["airflow-scheduler"])
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"].lower() == "true", "a fresh stack must not send on its own"
    assert env["AIRFLOW__CORE__FERNET_KEY"] == SECRETS["AIRFLOW_FERNET_KEY"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == SECRETS["AIRFLOW_JWT_SECRET"]
    execution_api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.path == "/execution/"
    assert execution_api.port in container_ports(service_of_host(services, execution_api.hostname))


@pytest.mark.parametrize("name", AIRFLOW_SERVICES + ("sandbox",))
def test_pythonpath_is_the_mounted_include(services, name):
    service = services[name]
    entries = env_of(service)["PYTHONPATH"].split(":")
    dockerfile_env = re.search(r"^ENV\s+PYTHONPATH=(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert dockerfile_env and dockerfile_env.group(1).split(":") == entries, "Dockerfile and compose disagree"
    for entry in entries:
        host = container_to_host(service, entry)
        assert (host / "lead_sync").is_dir() and (host / "cutmeshort_sandbox").is_dir()


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_mounts_code(services, name):
    mounts = bind_mounts(services[name])
    for target, folder in CODE_MOUNTS.items():
        assert target in mounts, f"{name} does not mount {target}"
        source, read_only = mounts[target]
        assert source == REPO / folder and source.is_dir(), f"{name}: {target} comes from {source}"
        assert read_only, f"{name}: mount {target} read-only"
    assert "/opt/airflow/logs" in mounts and "/opt/airflow/config" in mounts


@pytest.mark.parametrize("name", AIRFLOW_DAEMONS)
def test_daemons_wait_for_init_and_backends(services, name):
    depends = services[name]["depends_on"]
    assert depends["airflow-init"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"


def test_each_component_runs_once(services):
    commands = [" ".join(argv(services[name]["command"])) for name in AIRFLOW_DAEMONS]
    assert sorted(commands) == sorted(COMPONENT_COMMANDS)


def test_worker(services):
    worker = services["airflow-worker"]
    assert argv(worker["command"]) == ["celery", "worker"]
    assert env_of(worker)["DUMB_INIT_SETSID"] == "0"
    depends = worker["depends_on"]
    assert depends["warehouse"]["condition"] == "service_healthy"
    assert depends["sandbox"]["condition"] == "service_healthy"
    # --scale airflow-worker=N: no fixed container name, no host port two replicas would share.
    assert "container_name" not in worker and not worker.get("ports")


def test_worker_healthcheck_uses_the_locked_celery_provider(services):
    test = " ".join(services["airflow-worker"]["healthcheck"]["test"])
    app = re.search(r"--app (\S+)\.app\b", test)
    assert app, test
    module_file = app.group(1).replace(".", "/") + ".py"
    provider = importlib.metadata.distribution("apache-airflow-providers-celery")
    assert provider.version == locked_version("apache-airflow-providers-celery")
    assert any(str(f) == module_file for f in provider.files or []), f"{module_file} is not in the provider"


@pytest.mark.parametrize("name", ["postgres", "redis", "warehouse", "sandbox", *AIRFLOW_DAEMONS])
def test_healthchecks(services, name):
    assert services[name]["healthcheck"]["test"]


# --------------------------------------------------------------------------- airflow-init


def test_init_migrates_then_creates_pool(services):
    init = services["airflow-init"]
    script = " ".join(argv(init.get("command")))
    migrate = re.search(r"airflow db migrate", script)
    assert migrate, "airflow-init must run airflow db migrate"
    pool_import = re.search(r"airflow pools import (\S+)", script)
    assert pool_import, f"airflow-init must create the {POOL_NAME} pool"
    assert migrate.start() < pool_import.start(), "pools need the migrated schema"

    pools_file = container_to_host(init, pool_import.group(1))
    assert pools_file.is_file(), f"{pools_file} is missing"
    pool = json.loads(pools_file.read_text())[POOL_NAME]
    assert isinstance(pool["slots"], int) and pool["slots"] >= 1
    assert pool["description"]


def test_init_runs_as_root_and_seeds_ui_user(services):
    init = services["airflow-init"]
    assert init["user"] == "0:0"
    env = env_of(init)
    assert env["AIRFLOW_UI_USERNAME"]
    assert env["AIRFLOW_UI_PASSWORD"] == SECRETS["AIRFLOW_UI_PASSWORD"]
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{env['AIRFLOW_UI_USERNAME']}:admin"
    passwords_file = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert container_to_host(init, passwords_file).parent == REPO / "config"
    assert passwords_file in " ".join(argv(init["command"]))


# --------------------------------------------------------------------------- connections


def test_warehouse_connection_points_at_warehouse_service(services):
    conn = connection(services, "warehouse_default")
    assert conn["conn_type"] == "postgres"
    warehouse = service_of_host(services, conn["host"])
    assert conn["port"] in container_ports(warehouse)
    warehouse_env = env_of(warehouse)
    assert conn["login"] == warehouse_env["POSTGRES_USER"]
    assert conn["password"] == warehouse_env["POSTGRES_PASSWORD"]
    assert conn["schema"] == warehouse_env["POSTGRES_DB"]


def test_cutmeshort_connection(services):
    conn = connection(services, "cutmeshort_default")
    assert conn["conn_type"] == "http"
    url = urlsplit(conn["host"])
    assert url.scheme in {"http", "https"} and url.hostname
    assert conn["password"] == SECRETS["CUTMESHORT_TOKEN"], "the API token goes in the password"
    extra = conn["extra"]
    assert isinstance(extra["rate_limit_per_minute"], int) and extra["rate_limit_per_minute"] > 0
    if url.scheme == "http" and url.hostname not in LOOPBACK_HOSTS:
        # The product refuses clear-text http to other hosts without this explicit opt-in.
        assert extra.get("allow_insecure_http") is True
    else:
        assert "allow_insecure_http" not in extra


def test_sandbox_matches_connection(services):
    sandbox = services["sandbox"]
    command = argv(sandbox["command"])
    assert command[:3] == ["python", "-m", "cutmeshort_sandbox"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = int(command[command.index("--port") + 1])
    assert port in container_ports(sandbox)
    assert str(port) in " ".join(sandbox["healthcheck"]["test"])

    conn = connection(services, "cutmeshort_default")
    url = urlsplit(conn["host"])
    if url.hostname == "sandbox":
        assert url.port == port
        assert env_of(sandbox)["CUTMESHORT_SANDBOX_TOKEN"] == conn["password"]


# --------------------------------------------------------------------------- ports


def test_published_ports_are_loopback_only(services):
    exposed = sorted(f"{name}: {ip or '*'}:{host}->{container}" for name, service in services.items()
                     for ip, host, container in published_ports(service) if ip != "127.0.0.1")
    assert not exposed, f"bind published ports to 127.0.0.1: {exposed}"


def test_published_ports_are_documented_in_header(services):
    header = "\n".join(line for line in COMPOSE_TEXT.split("\n---", 1)[0].splitlines() if line.startswith("#"))
    for name, service in services.items():
        for _, host_port, _ in published_ports(service):
            assert re.search(rf"^#\s+{host_port}\s", header, re.MULTILINE), f"{name}: port {host_port} is not documented"
    for step in ("make compose-env", "docker compose up airflow-init", "http://localhost:8080"):
        assert step in header
    for name in SECRET_VARIABLES:
        assert name in header, f"the header does not list the required {name}"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


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


def dockerignore() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_copies_only_what_the_context_allows():
    lines = dockerignore()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for op, arg in dockerfile_instructions():
        if op != "COPY":
            continue
        sources = [part for part in shlex.split(arg) if not part.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: not in the .dockerignore allowlist"
            assert (REPO / source).exists(), f"COPY {source}: missing from the checkout"


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
    ignored = {line.strip().lstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored, ".env (make compose-env) holds secrets: list it in .gitignore"

"""Static checks of docker-compose.yaml, the Dockerfile and the files they reference.

There is no Docker engine where the suite runs, so the compose file is parsed, not started.
Compose-style ``${VAR:-default}`` substitutions are resolved with their defaults, which is
what a user without a .env file gets.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
LOCK_FILE = REPO / "requirements.lock"

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
)
# Long-running Airflow components: they must wait for airflow-init to finish.
AIRFLOW_DAEMONS = tuple(s for s in AIRFLOW_SERVICES if s != "airflow-init")
OTHER_SERVICES = ("postgres", "redis", "warehouse", "sandbox")

CODE_MOUNTS = {
    "/opt/airflow/dags": "dags",
    "/opt/airflow/plugins": "plugins",
    "/opt/airflow/include": "include",
}

# Every host port the stack publishes: (service, host ip, host port, container port).
# The header comment of docker-compose.yaml documents the same list.
PUBLISHED_PORTS = {
    ("airflow-apiserver", "127.0.0.1", 8080, 8080),
    ("warehouse", "127.0.0.1", 5433, 5432),
    ("sandbox", "127.0.0.1", 8765, 8765),
}

POOL_NAME = "cutmeshort_api"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


# --------------------------------------------------------------------------- helpers

_SUBSTITUTION = re.compile(
    r"\$\$"  # escaped dollar
    r"|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Apply compose interpolation to ``value`` with the variables in ``env`` (none by default)."""
    env = env or {}

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("bare"):
            return env.get(match.group("bare"), "")
        name, op, arg = match.group("braced"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op is None:
            return current or ""
        unset_or_empty = op.startswith(":")
        missing = current is None or (unset_or_empty and current == "")
        kind = op[-1]
        if kind == "-":
            return arg if missing else current
        if kind == "?":
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return "" if missing else arg  # "+"

    return _SUBSTITUTION.sub(replace, value)


def test_resolve_helper():
    assert resolve("${A:-x}") == "x"
    assert resolve("${A:-x}", {"A": "y"}) == "y"
    assert resolve("${A:-x}", {"A": ""}) == "x"
    assert resolve("${A-x}", {"A": ""}) == ""
    assert resolve('{"p": "${T:-tok}"}') == '{"p": "tok"}'
    assert resolve("$${HOSTNAME}") == "${HOSTNAME}"
    with pytest.raises(AssertionError):
        resolve("${A:?needed}")


@pytest.fixture(scope="module")
def compose() -> dict:
    # SafeLoader resolves anchors and "<<" merge keys, as compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def common(compose) -> dict:
    return compose["x-airflow-common"]


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    assert isinstance(environment, dict), "use the mapping form for environment"
    return {k: resolve(str(v)) for k, v in environment.items()}


def command_text(service: dict) -> str:
    command = service.get("command", "")
    if isinstance(command, list):
        return " ".join(str(part) for part in command)
    return str(command)


def bind_mounts(service: dict) -> dict[str, str]:
    """Container path -> host path, for short-syntax bind mounts of the service."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"unexpected long-syntax volume {volume!r}"
        parts = resolve(volume).split(":")
        source, target = parts[0], parts[1]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def published_ports(service_name: str, service: dict) -> set[tuple[str, str, int, int]]:
    found = set()
    for port in service.get("ports", []):
        assert isinstance(port, str), f"{service_name}: quote port mappings ({port!r})"
        parts = resolve(port).split(":")
        assert len(parts) == 3, f"{service_name}: bind {port!r} to an explicit host address"
        host_ip, host_port, container_port = parts
        found.add((service_name, host_ip, int(host_port), int(container_port)))
    return found


def connection(services, conn_id: str) -> dict:
    raw = env_of(services["airflow-worker"])[f"AIRFLOW_CONN_{conn_id.upper()}"]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:  # pragma: no cover - message only
        pytest.fail(f"AIRFLOW_CONN_{conn_id.upper()} is not valid JSON after substitution: {exc}")
    assert isinstance(value, dict)
    return value


def locked_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)\s*$", LOCK_FILE.read_text(), re.MULTILINE)
    assert match, f"{package} is not pinned in requirements.lock"
    return match.group(1)


def container_to_host(service: dict, container_path: str) -> Path:
    """Map a path inside a container to the repo file behind its bind mount."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(service).items():
        try:
            relative = path.relative_to(target)
        except ValueError:
            continue
        return (REPO / source / relative).resolve()
    raise AssertionError(f"{container_path} is not under any bind mount")


# --------------------------------------------------------------------------- services


def test_all_services_defined(services):
    missing = set(AIRFLOW_SERVICES + OTHER_SERVICES) - set(services)
    assert not missing, f"services missing from docker-compose.yaml: {sorted(missing)}"


def test_named_volumes_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    assert {"postgres-db-volume", "warehouse-db-volume"} <= declared
    assert "postgres-db-volume:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "warehouse-db-volume:/var/lib/postgresql/data" in services["warehouse"]["volumes"]


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_uses_common_image_and_celery(services, common, name):
    service = services[name]
    assert service.get("build") == common["build"] == "."
    assert service.get("image") == common["image"]
    assert env_of(service)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_image_tag_follows_locked_airflow_version(common):
    image = resolve(common["image"])
    assert image.rsplit(":", 1)[-1] == locked_version("apache-airflow")


def test_common_environment(common, services):
    env = {k: resolve(str(v)) for k, v in common["environment"].items()}
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"].lower() in {"true", "false"}
    assert env["PYTHONPATH"] == "/opt/airflow/include"

    metadata = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert metadata.scheme == "postgresql+psycopg2"
    assert metadata.hostname == "postgres"
    assert urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).hostname == "redis"
    assert urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"]).hostname == "postgres"

    execution_api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.hostname == "airflow-apiserver"
    assert execution_api.path == "/execution/"
    apiserver_ports = {c for (_, _, _, c) in published_ports("x", services["airflow-apiserver"])}
    assert execution_api.port in apiserver_ports

    fernet = base64.urlsafe_b64decode(env["AIRFLOW__CORE__FERNET_KEY"])
    assert len(fernet) == 32, "the default Fernet key must be a valid key"
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32


def test_secrets_are_overridable(common):
    env = common["environment"]
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET"):
        assert re.fullmatch(r"\$\{[A-Z_]+:-[^}]+\}", env[key]), f"{key} should come from .env"


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_services_share_secrets_and_connections(services, common, name):
    # A service overriding "environment" without merging the common block would lose them.
    expected = {k: resolve(str(v)) for k, v in common["environment"].items()}
    env = env_of(services[name])
    for key, value in expected.items():
        assert env.get(key) == value, f"{name}: {key} differs from x-airflow-common"


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_mounts_code(services, name):
    mounts = bind_mounts(services[name])
    for target, folder in CODE_MOUNTS.items():
        assert target in mounts, f"{name} does not mount {target}"
        assert (REPO / mounts[target]).resolve() == (REPO / folder).resolve()
    assert "/opt/airflow/logs" in mounts
    assert "/opt/airflow/config" in mounts


@pytest.mark.parametrize("folder", sorted(set(CODE_MOUNTS.values())))
def test_mounted_code_folders_exist(folder):
    assert (REPO / folder).is_dir()


@pytest.mark.parametrize("name", AIRFLOW_DAEMONS)
def test_daemons_wait_for_init_and_backends(services, name):
    depends = services[name]["depends_on"]
    assert depends["airflow-init"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"


def test_component_commands(services):
    assert command_text(services["airflow-apiserver"]) == "api-server"
    assert command_text(services["airflow-scheduler"]) == "scheduler"
    assert command_text(services["airflow-dag-processor"]) == "dag-processor"
    assert command_text(services["airflow-triggerer"]) == "triggerer"


def test_worker(services):
    worker = services["airflow-worker"]
    assert command_text(worker) == "celery worker"
    assert env_of(worker)["DUMB_INIT_SETSID"] == "0"
    depends = worker["depends_on"]
    assert depends["warehouse"]["condition"] == "service_healthy"
    assert depends["sandbox"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["postgres", "redis", "warehouse", "sandbox", "airflow-apiserver"])
def test_healthchecks(services, name):
    assert services[name]["healthcheck"]["test"]


def test_apiserver_healthcheck_hits_version_endpoint(services):
    assert "/api/v2/version" in " ".join(services["airflow-apiserver"]["healthcheck"]["test"])


# --------------------------------------------------------------------------- airflow-init


def test_init_migrates_then_creates_pool(services):
    init = services["airflow-init"]
    script = command_text(init)
    migrate = re.search(r"airflow db migrate", script)
    assert migrate, "airflow-init must run airflow db migrate"

    pool_set = re.search(rf"airflow pools set {POOL_NAME} (\d+) ", script)
    pool_import = re.search(r"airflow pools import (\S+)", script)
    assert pool_set or pool_import, f"airflow-init must create the {POOL_NAME} pool"
    pool_step = pool_set or pool_import
    assert migrate.start() < pool_step.start(), "pools need the migrated schema"

    if pool_set:
        assert int(pool_set.group(1)) >= 1
    else:
        pools_file = container_to_host(init, pool_import.group(1))
        assert pools_file.is_file(), f"{pools_file} is missing"
        pools = json.loads(pools_file.read_text())
        pool = pools[POOL_NAME]
        assert isinstance(pool["slots"], int) and pool["slots"] >= 1
        assert pool["description"]


def test_init_runs_as_root_and_seeds_ui_user(services, common):
    init = services["airflow-init"]
    assert init["user"] == "0:0"
    env = env_of(init)
    assert env["AIRFLOW_UI_USERNAME"] and env["AIRFLOW_UI_PASSWORD"]
    users = resolve(common["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"])
    assert users == f"{env['AIRFLOW_UI_USERNAME']}:admin"
    passwords_file = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert passwords_file.startswith("/opt/airflow/config/")
    assert passwords_file in command_text(init)


# --------------------------------------------------------------------------- connections


def test_warehouse_connection_points_at_warehouse_service(services):
    conn = connection(services, "warehouse_default")
    assert conn["conn_type"] == "postgres"
    assert conn["host"] == "warehouse" and conn["host"] in services
    warehouse_env = env_of(services["warehouse"])
    assert conn["port"] == 5432
    assert conn["login"] == warehouse_env["POSTGRES_USER"]
    assert conn["password"] == warehouse_env["POSTGRES_PASSWORD"]
    assert conn["schema"] == warehouse_env["POSTGRES_DB"]


def test_cutmeshort_connection(services):
    conn = connection(services, "cutmeshort_default")
    assert conn["conn_type"] == "http"
    url = urlsplit(conn["host"])
    assert url.scheme in {"http", "https"}
    assert url.hostname
    assert conn["password"], "the API token goes in the password"
    extra = conn["extra"]
    assert isinstance(extra, dict)
    assert isinstance(extra["rate_limit_per_minute"], int) and extra["rate_limit_per_minute"] > 0
    if url.scheme == "http" and url.hostname not in LOOPBACK_HOSTS:
        # The product refuses clear-text http to other hosts without this explicit opt-in.
        assert extra.get("allow_insecure_http") is True
    else:
        assert "allow_insecure_http" not in extra


def test_cutmeshort_token_is_overridable_and_matches_sandbox(services, common):
    raw = common["environment"]["AIRFLOW_CONN_CUTMESHORT_DEFAULT"]
    assert "${CUTMESHORT_TOKEN:-" in raw
    custom = {"CUTMESHORT_TOKEN": "tok-123"}
    assert json.loads(resolve(raw, custom))["password"] == "tok-123"
    sandbox_token = services["sandbox"]["environment"]["CUTMESHORT_SANDBOX_TOKEN"]
    assert resolve(sandbox_token, custom) == "tok-123"
    assert resolve(sandbox_token) == connection(services, "cutmeshort_default")["password"]


# --------------------------------------------------------------------------- sandbox


def test_sandbox_matches_connection(services, common):
    sandbox = services["sandbox"]
    assert sandbox.get("image") == common["image"]
    assert sandbox.get("build") == "."
    argv = shlex.split(command_text(sandbox))
    assert argv[:3] == ["python", "-m", "cutmeshort_sandbox"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = int(argv[argv.index("--port") + 1])

    host = urlsplit(connection(services, "cutmeshort_default")["host"])
    if host.hostname == "sandbox":
        assert host.port == port
    container_ports = {c for (_, _, _, c) in published_ports("sandbox", sandbox)}
    assert port in container_ports
    assert str(port) in " ".join(sandbox["healthcheck"]["test"])

    assert env_of(sandbox)["PYTHONPATH"] == "/opt/airflow/include"
    assert bind_mounts(sandbox).get("/opt/airflow/include") == "./include"


# --------------------------------------------------------------------------- ports


def test_only_documented_ports_are_published(services):
    found = set()
    for name, service in services.items():
        found |= published_ports(name, service)
    assert found == PUBLISHED_PORTS


def test_published_ports_are_documented_in_header():
    header = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header_text = "\n".join(header)
    for _, _, host_port, _ in PUBLISHED_PORTS:
        assert re.search(rf"\b{host_port}\b", header_text), f"port {host_port} is not documented"
    assert "docker compose up airflow-init" in header_text
    assert "http://localhost:8080" in header_text


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_matches_lock():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[\d.]+)-python(?P<python>\d+\.\d+)", froms[0])
    assert match, f"unexpected base image {froms[0]}"
    assert match.group("airflow") == locked_version("apache-airflow")
    assert match.group("python") == "3.11"


def test_dockerfile_installs_pinned_requirements_as_airflow_user():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    pip_index = next(i for i, line in enumerate(lines) if "pip install" in line)
    pip_line = lines[pip_index]
    assert "--no-cache-dir" in pip_line
    assert re.search(r"-r \S*requirements\.txt\b", pip_line)
    assert re.search(r"-c \S*requirements\.lock\b", pip_line)
    users = [line.split()[1] for line in lines[:pip_index] if line.startswith("USER ")]
    assert users and users[-1] == "airflow"
    copies = " ".join(line for line in lines[:pip_index] if line.startswith("COPY "))
    assert "requirements.txt" in copies and "requirements.lock" in copies


def test_dockerfile_sets_pythonpath():
    assert re.search(r"^ENV\s+PYTHONPATH=/opt/airflow/include\s*$", DOCKERFILE.read_text(), re.MULTILINE)


def test_dockerignore_keeps_secrets_and_venv_out():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the build context is an allowlist"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"requirements.txt", "requirements.lock", "dags", "plugins", "include"} <= allowed
    assert not allowed & {".env", ".venv", "logs", "config", ".git"}

"""docker-compose.yaml's services as compose resolves them: the stack the README describes, each
service reaching the others by name, waiting for what it needs, and publishing on the loopback only."""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support import ROOT
from tests.support.compose import (
    AIRFLOW_DAEMONS, AIRFLOW_SERVICES, COMPONENT_COMMANDS, COMPOSE_TEXT, DOCKERFILE, HEADER, INIT, KEPT_RUNNING,
    LOOPBACK_HOSTS, README, README_COMPOSE, SANDBOX, SECRET_VARIABLES, SECRETS, WAITED_FOR, WORKER_COMMANDS,
    argv, baked_in_code, bind_mounts, connection, container_ports, container_to_host, env_of, locked_version,
    published_ports, running, service_of_host, volumes, worker,
)


def test_the_services_documented_commands_name_exist(services):
    """The README's and the file header's `docker compose up|run` commands name services of the file."""
    named = set()
    for arguments in re.findall(r"docker[ -]compose (?:up|run)\b([^\n#&]*)", README_COMPOSE + "\n" + HEADER):
        words = iter(arguments.split())
        for word in words:
            if word == "--scale":
                named.add(next(words).split("=", 1)[0])
            elif not word.startswith("-"):
                named.add(word)  # the service; what follows is its command
                break
    assert named, "no documented docker compose command names a service"
    assert named <= set(services), f"documented but not in docker-compose.yaml: {sorted(named - set(services))}"


def test_each_airflow_component_runs_once_as_the_readme_lists(services):
    """Airflow 3 runs each component as a process of its own (and the executor's workers): one
    service each, and the README's list of the stack names them all."""
    executor = env_of(running(services, "scheduler"))["AIRFLOW__CORE__EXECUTOR"]
    commands = sorted(" ".join(argv(services[name]["command"])) for name in AIRFLOW_DAEMONS)
    assert commands == sorted(COMPONENT_COMMANDS | {WORKER_COMMANDS[executor]})
    stack = re.search(r"runs the official Airflow [\d.]+ \w+ stack \(([^)]*)\)", " ".join(README_COMPOSE.split()))
    assert stack, "the README's compose section does not list the stack"
    listed = {part.strip().lower() for part in stack.group(1).split(",")}
    assert {command.lower() for command in commands} <= listed, listed


def test_database_services_keep_their_data_in_declared_volumes(config, services):
    declared = set(config.get("volumes") or {})
    databases = [name for name, service in services.items() if service.get("image", "").startswith("postgres:")]
    assert databases
    for name in databases:
        data = {source: target for source, target, _ in volumes(services[name])}
        named = [source for source, target in data.items() if target == "/var/lib/postgresql/data"]
        assert named and named[0] in declared, f"{name}: its data must live in a declared named volume"


@pytest.mark.parametrize("name", [*AIRFLOW_SERVICES, SANDBOX])
def test_service_runs_the_project_image(services, name):
    """Airflow and the sandbox run the image the repository's Dockerfile builds."""
    service = services[name]
    build = service.get("build")
    context = build.get("context") if isinstance(build, dict) else build
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    assert Path(context) == ROOT, f"{name} is not built from this checkout"
    assert Path(context) / dockerfile == DOCKERFILE, f"{name} is not built from the repository's Dockerfile"
    assert service["image"] == running(services, "api-server")["image"], f"{name} runs another image"


def test_image_tag_follows_locked_airflow_version(services):
    assert running(services, "api-server")["image"].rsplit(":", 1)[-1] == locked_version("apache-airflow")


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


def test_executor_is_the_readmes_with_a_redis_broker(services):
    env = env_of(running(services, "scheduler"))
    documented = set(re.findall(r"(\w+Executor) of `docker-compose\.yaml`", README))
    documented |= set(re.findall(r"with the (\w+Executor)", HEADER))
    assert documented == {env["AIRFLOW__CORE__EXECUTOR"]}, documented
    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis"
    redis = service_of_host(services, broker.hostname)
    assert redis["image"].split(":")[0] == "redis"
    assert (broker.port or 6379) in container_ports(redis)


@pytest.mark.parametrize("key", ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"])
def test_metadata_urls_match_postgres_service(services, key):
    url = urlsplit(env_of(running(services, "scheduler"))[key])
    assert url.scheme in {"postgresql+psycopg2", "db+postgresql"}
    service = service_of_host(services, url.hostname)
    assert service["image"].startswith("postgres:")
    postgres = env_of(service)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"] == SECRETS["AIRFLOW_DB_PASSWORD"]
    assert url.path.lstrip("/") == postgres["POSTGRES_DB"]


def test_services_reach_each_other_by_service_name(services):
    """Inside a container, localhost is that container: every host a service's settings name (URLs,
    connections) is another service of the file, or a name outside the stack."""
    problems = []
    for name, service in services.items():
        for key, value in env_of(service).items():
            hosts = [urlsplit(value).hostname] if "://" in value else []
            if value.startswith("{"):
                host = json.loads(value).get("host")
                hosts.append(urlsplit(host).hostname if "://" in str(host) else host)
            for host in filter(None, hosts):
                if host in LOOPBACK_HOSTS or (host not in services and "." not in host):
                    problems.append(f"{name}: {key} names {host}")
    assert not problems, problems


def test_airflow_settings(services):
    env = env_of(running(services, "scheduler"))
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    # The header: "Run the DAG (it is paused when first loaded)".
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"].lower() == "true", "a fresh stack must not send on its own"
    assert env["AIRFLOW__CORE__FERNET_KEY"] == SECRETS["AIRFLOW_FERNET_KEY"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == SECRETS["AIRFLOW_JWT_SECRET"]
    execution_api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.path == "/execution/"
    assert service_of_host(services, execution_api.hostname) is running(services, "api-server")
    assert execution_api.port in container_ports(running(services, "api-server"))


@pytest.mark.parametrize("name", [*AIRFLOW_SERVICES, SANDBOX])
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
    """The checkout is mounted, read-only, over the code the image bakes in: the README's dags/,
    plugins/ and include/ among it."""
    code = baked_in_code()
    readme_folders = set(re.findall(r"`(\w+)/`", re.search(r"mounting ([^.]*)", README_COMPOSE).group(1)))
    assert readme_folders and readme_folders <= set(code.values()), (readme_folders, code)
    mounts = bind_mounts(services[name])
    for target, folder in code.items():
        assert target in mounts, f"{name} does not mount {target}"
        source, read_only = mounts[target]
        assert source == ROOT / folder and source.is_dir(), f"{name}: {target} comes from {source}"
        assert read_only, f"{name}: mount {target} read-only"
    assert "/opt/airflow/logs" in mounts and "/opt/airflow/config" in mounts


@pytest.mark.parametrize("name", AIRFLOW_DAEMONS)
def test_daemons_wait_for_init_and_backends(services, name):
    """Every daemon starts once the init has finished and the metadata database and broker are healthy."""
    env = env_of(services[name])
    depends = services[name]["depends_on"]
    assert depends[INIT]["condition"] == "service_completed_successfully"
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL"):
        assert depends[urlsplit(env[key]).hostname]["condition"] == "service_healthy", key


def test_worker(services):
    """Tasks run on the workers: they wait for what the tasks reach (the warehouse, the API when it
    is a service of the stack, the execution API), stop gracefully, and scale."""
    tasks = worker(services)
    assert env_of(tasks)["DUMB_INIT_SETSID"] == "0"  # the official image: a warm shutdown on stop
    depends = tasks["depends_on"]
    hosts = {connection(services, "warehouse_default")["host"],
             urlsplit(env_of(tasks)["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname}
    api = urlsplit(connection(services, "cutmeshort_default")["host"]).hostname
    hosts |= {api} if api in services else set()
    for host in hosts:
        assert depends[host]["condition"] == "service_healthy", host
    # --scale airflow-worker=N: no fixed container name, no host port two replicas would share.
    assert "container_name" not in tasks and not tasks.get("ports")


def test_worker_healthcheck_uses_the_locked_celery_provider(services):
    test = " ".join(worker(services)["healthcheck"]["test"])
    app = re.search(r"--app (\S+)\.app\b", test)
    assert app, test
    module_file = app.group(1).replace(".", "/") + ".py"
    provider = importlib.metadata.distribution("apache-airflow-providers-celery")
    assert provider.version == locked_version("apache-airflow-providers-celery")
    assert any(str(f) == module_file for f in provider.files or []), f"{module_file} is not in the provider"


@pytest.mark.parametrize("name", sorted({*WAITED_FOR, *KEPT_RUNNING}))
def test_healthchecks(services, name):
    """Compose can wait for a service to be healthy only if it has a health check; a service kept
    running says when it is not."""
    assert services[name]["healthcheck"]["test"]


# --------------------------------------------------------------------------- airflow-init


def test_init_migrates_then_creates_the_pools_the_dags_use(services):
    init = services[INIT]
    script = " ".join(argv(init.get("command")))
    migrate = re.search(r"airflow db migrate", script)
    assert migrate, "the init must run airflow db migrate"
    pool_import = re.search(r"airflow pools import (\S+)", script)
    assert pool_import, "the init must create the pools"
    assert migrate.start() < pool_import.start(), "pools need the migrated schema"

    pools_file = container_to_host(init, pool_import.group(1))
    assert pools_file.is_file(), f"{pools_file} is missing"
    pools = json.loads(pools_file.read_text())
    used = {pool for dag in (ROOT / "dags").glob("*.py") for pool in re.findall(r'\bpool="([^"]+)"', dag.read_text())}
    assert used and used <= set(pools), f"pools the DAGs use but the init does not create: {used - set(pools)}"
    for name in used:
        assert isinstance(pools[name]["slots"], int) and pools[name]["slots"] >= 1
        assert pools[name]["description"]
    # The README: "create the pool `NAME` with N slots ..., as docker-compose.yaml does".
    for name, slots in re.findall(r"pool `(\w+)` with (\d+) slots", " ".join(README.split())):
        assert pools[name]["slots"] == int(slots), name


def test_init_runs_as_root_and_seeds_ui_user(services):
    """As root, to give the mounted logs and the password file to AIRFLOW_UID."""
    init = services[INIT]
    assert init["user"] == "0:0"
    env = env_of(init)
    assert env["AIRFLOW_UI_USERNAME"]
    assert env["AIRFLOW_UI_PASSWORD"] == SECRETS["AIRFLOW_UI_PASSWORD"]
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{env['AIRFLOW_UI_USERNAME']}:admin"
    passwords_file = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert container_to_host(init, passwords_file).parent == ROOT / "config"
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
    sandbox = services[SANDBOX]
    command = argv(sandbox["command"])
    assert command[command.index("--host") + 1] == "0.0.0.0", "other containers must reach it"
    port = int(command[command.index("--port") + 1])
    assert port in container_ports(sandbox)
    assert str(port) in " ".join(sandbox["healthcheck"]["test"])

    conn = connection(services, "cutmeshort_default")
    url = urlsplit(conn["host"])
    if url.hostname == SANDBOX:
        assert url.port == port
        assert env_of(sandbox)["CUTMESHORT_SANDBOX_TOKEN"] == conn["password"]


# --------------------------------------------------------------------------- ports


def test_published_ports_are_loopback_only(services):
    exposed = sorted(f"{name}: {ip or '*'}:{host}->{container}" for name, service in services.items()
                     for ip, host, container in published_ports(service) if ip != "127.0.0.1")
    assert not exposed, f"bind published ports to 127.0.0.1: {exposed}"


def test_published_ports_are_documented_in_header(services):
    for name, service in services.items():
        for _, host_port, _ in published_ports(service):
            documented = re.search(rf"^#\s+{host_port}\s", HEADER, re.MULTILINE)
            assert documented, f"{name}: port {host_port} is not documented"
    for name in SECRET_VARIABLES:
        assert name in HEADER, f"the header does not list the required {name}"


def test_header_and_readme_give_the_same_steps(services):
    """The README's compose commands are the header's, and the UI address both give is the API
    server's port, published on the loopback."""
    block = re.search(r"```bash\n(.*?)```", README_COMPOSE, re.DOTALL)
    assert block, "the README's compose section has no commands"
    steps = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]
    assert steps
    for step in steps:
        assert step in HEADER, f"the header does not say {step!r}"
    urls = set(re.findall(r"http://localhost:(\d+)", HEADER + "\n" + README_COMPOSE))
    assert urls, "neither the header nor the README says where the UI is"
    published = {host for ip, host, _ in published_ports(running(services, "api-server")) if ip == "127.0.0.1"}
    assert {int(port) for port in urls} <= published, (urls, published)

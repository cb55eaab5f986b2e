"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine on the build machines)."""

import importlib
import importlib.metadata
import inspect
import json
import re
import shlex
import tomllib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices

from threadline_core import topics
from threadline_core.runtime import WATCHDOG_MARGIN_SECONDS
from threadline_core.settings import CoreSettings
from threadline_core.topics import ALL_TOPICS
from threadline_sandbox import Isolation
from threadline_sandbox.runner import _unshare_command
from threadline_search.index import SCOPED_IDF_VERSION

ROOT = Path(__file__).resolve().parents[1]
APP_SERVICES = {"gateway": "gateway", "run-orchestrator": "run_orchestrator", "tool-executor": "tool_executor",
                "ingestion": "ingestion", "notifier": "notifier"}
"""Compose service -> Python package it runs."""
SCALABLE = set(APP_SERVICES) - {"gateway"}
QDRANT_USERS = {"tool-executor", "ingestion"}
"""Services that search or index vectors: they need a Qdrant server (local mode is single-process)."""
PLANNED_SCALE = 3
"""`docker compose up --scale run-orchestrator=3 --scale notifier=2` must give every replica partitions."""
NAMESPACE_SECURITY_OPT = {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"}
"""What Docker must lift for `unshare --user --pid --mount-proc`: its seccomp profile refuses the unshare, its AppArmor
profile the mounts, and its masked /proc paths make the kernel refuse a fresh /proc ("mount too revealing")."""

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Resolve ${VAR:-default} the way compose does with an empty environment."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml with anchors merged and variables at their defaults."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return dict(_interpolate(data))


def settings_class(package: str) -> type[CoreSettings]:
    """The CoreSettings subclass defined in `<package>.settings`."""
    module = importlib.import_module(f"{package}.settings")
    found = [c for _, c in inspect.getmembers(module, inspect.isclass)
             if issubclass(c, CoreSettings) and c is not CoreSettings and c.__module__ == module.__name__]
    assert len(found) == 1, f"{package}.settings should define one settings class, found {found}"
    return found[0]


def accepted_env(cls: type[CoreSettings]) -> set[str]:
    """Every environment variable name the settings class reads (upper case)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field.alias or field_name}".upper())
    return names


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    assert match and value, f"duration {value!r}"
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    """A strict parser of the Compose Specification (unknown keys, bad durations, ports or conditions refused)
    accepts the file and finds every network, volume, config and secret a service uses defined."""
    parsed = PyCompose.from_json(json.dumps(compose))
    parsed.validate()
    assert set(parsed.service_names()) == set(compose["services"])


def test_every_service_has_an_image_or_a_build(compose: dict[str, Any]) -> None:
    """Infrastructure from official images, our services built from the one Dockerfile."""
    services = compose["services"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    for name in [*APP_SERVICES, "migrate"]:
        build = services[name]["build"]
        assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile", name
    assert not any("zookeeper" in name for name in services)


def test_kafka_runs_in_kraft_mode_with_a_healthcheck(compose: dict[str, Any]) -> None:
    """A single combined broker/controller, no ZooKeeper, data on a named volume."""
    kafka = compose["services"]["kafka"]
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")
    assert env.get("CLUSTER_ID"), "KRaft storage needs a cluster id"
    assert not any(k.startswith("KAFKA_ZOOKEEPER") for k in env)
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert any(v.split(":")[1] == env["KAFKA_LOG_DIRS"] for v in kafka["volumes"])
    assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])


def test_topics_are_created_with_enough_partitions(compose: dict[str, Any]) -> None:
    """kafka-init creates every topic with THREADLINE_TOPIC_PARTITIONS partitions before any service starts."""
    init = compose["services"]["kafka-init"]
    script = " ".join(_command(init))
    created = set(re.search(r"for topic in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    assert created == set(ALL_TOPICS)
    partitions = int(re.search(r"--partitions (\d+)", script).group(1))  # type: ignore[union-attr]
    assert "--if-not-exists" in script
    for name in APP_SERVICES:
        assert int(_env(compose["services"][name])["THREADLINE_TOPIC_PARTITIONS"]) == partitions, name
    assert partitions >= PLANNED_SCALE
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_postgres_and_qdrant_have_volumes_and_healthchecks(compose: dict[str, Any]) -> None:
    """Named volumes for all data; pg_isready and Qdrant's /readyz as health checks."""
    services = compose["services"]
    declared = set(compose["volumes"])
    used = {v.split(":")[0] for svc in services.values() for v in svc.get("volumes", [])}
    assert used == declared == {"kafka-data", "postgres-data", "qdrant-data"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/readyz" in " ".join(services["qdrant"]["healthcheck"]["test"])
    pg_env = _env(services["postgres"])
    url = _env(services["gateway"])["DATABASE_URL"]
    assert url == (f"postgresql://{pg_env['POSTGRES_USER']}:{pg_env['POSTGRES_PASSWORD']}@postgres:5432/"
                   f"{pg_env['POSTGRES_DB']}")


def test_migration_runs_once_before_the_services(compose: dict[str, Any]) -> None:
    """`python -m gateway migrate` as a one-shot that every service waits for."""
    services = compose["services"]
    migrate = services["migrate"]
    assert _command(migrate) == ["gateway", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in APP_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["kafka-init"]["condition"] == "service_completed_successfully", name
        assert deps["kafka"]["condition"] == "service_healthy", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        if name in QDRANT_USERS:
            assert deps["qdrant"]["condition"] == "service_healthy", name
        else:
            assert "qdrant" not in deps, f"{name} never opens Qdrant: waiting for it only delays {name}"


def test_dependency_order_is_acyclic_and_conditions_are_satisfiable(compose: dict[str, Any]) -> None:
    """No cycles; service_healthy only on services with a health check; completed only on one-shots."""
    services = compose["services"]
    graph = {name: set(svc.get("depends_on", {})) for name, svc in services.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # pragma: no cover - the assertion message is the point
        pytest.fail(f"dependency cycle: {exc}")
    assert order.index("migrate") < min(order.index(n) for n in APP_SERVICES)
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
            if spec["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must be a one-shot"


def test_app_services_are_healthchecked_on_readyz_at_their_port(compose: dict[str, Any]) -> None:
    """Each service's health check asks /readyz on its THREADLINE_PORT; it binds 0.0.0.0."""
    for name, package in APP_SERVICES.items():
        svc = compose["services"][name]
        env = _env(svc)
        assert _command(svc) == [package]
        assert env["THREADLINE_HOST"] == "0.0.0.0"
        port = int(env.get("THREADLINE_PORT", settings_class(package).model_fields["port"].default))
        assert f"127.0.0.1:{port}/readyz" in " ".join(svc["healthcheck"]["test"]), name
        grace = float(env.get("THREADLINE_SHUTDOWN_GRACE_SECONDS",
                              CoreSettings.model_fields["shutdown_grace_seconds"].default))
        assert _seconds(svc["stop_grace_period"]) > grace + WATCHDOG_MARGIN_SECONDS, \
            f"{name}: docker would SIGKILL before the grace and the watchdog's dump of a hung service"


def test_scalable_services_have_no_fixed_names_or_host_ports(compose: dict[str, Any]) -> None:
    """`--scale run-orchestrator=3 --scale notifier=2` needs replicas that do not collide."""
    for name, svc in compose["services"].items():
        assert "container_name" not in svc, name
        if name in SCALABLE:
            assert "ports" not in svc, name
    assert compose["services"]["gateway"]["ports"] == ["8080:8080"]


def test_env_is_only_what_the_services_read(compose: dict[str, Any]) -> None:
    """Every variable passed to a service is a field of its pydantic settings (no dead configuration)."""
    services = compose["services"]
    for name, package in {**APP_SERVICES, "migrate": "gateway"}.items():
        env = _env(services[name])
        unknown = sorted(set(env) - accepted_env(settings_class(package)))
        assert not unknown, f"{name}: {unknown} are not read by {package} settings"
        assert env["DATABASE_URL"].startswith("postgresql://")
    for name in APP_SERVICES:
        env = _env(services[name])
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        if name in QDRANT_USERS:
            assert env["QDRANT_URL"] == "http://qdrant:6333", f"{name} must use the Qdrant server"


def test_dockerfile_is_multistage_slim_and_non_root() -> None:
    """python:3.11-slim builder + runtime, a non-root user, `python -m <service>`."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    stages = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(stages) >= 2 and all("${PYTHON_IMAGE}" in s for s in stages)
    final = text[text.rindex("\nFROM "):]
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    users = [ln.split()[1] for ln in final.splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["python", "-m"]' in lines
    assert any(ln.startswith("CMD [") for ln in lines)
    extras = re.search(r"pip install -q -c constraints.txt -e '\.\[([a-z,]+)\]'", (ROOT / "Makefile").read_text())
    assert extras, "the Makefile installs the project with its extras"
    served = [extra for extra in extras.group(1).split(",") if extra != "dev"]  # the sandbox's libraries too
    assert f'pip install -c constraints.txt ".[{",".join(served)}]"' in text
    makefile = (ROOT / "Makefile").read_text()
    no_deps = re.search(r"pip install -q -c constraints.txt --no-deps (.+)", makefile)
    assert no_deps, "Makefile installs packages without dependencies; the image must install the same"
    for package in no_deps.group(1).split():
        assert package.strip("'\"") in text.replace('"', ""), f"Dockerfile misses {package}"


def _pins() -> dict[str, str]:
    """constraints.txt as {normalized name: version}."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = [ln.split("==", 1) for ln in lines if ln.strip() and not ln.startswith("#")]
    assert all(len(pair) == 2 for pair in pairs), "constraints.txt holds only exact pins"
    return {canonicalize_name(name): version.strip() for name, version in pairs}


def test_every_dependency_is_pinned_and_installed_at_its_pin() -> None:
    """A new release upstream cannot change what `make install` or the image installs: every requirement of
    pyproject.toml (extras included) has an exact pin, and this environment holds the pinned versions."""
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    names = {canonicalize_name(Requirement(r).name) for r in wanted}
    assert names <= set(pins), f"add to constraints.txt (make lock): {sorted(names - set(pins))}"
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    differ = {name: (version, installed[name]) for name, version in pins.items()
              if name in installed and installed[name] != version}
    assert not differ, f"installed versions differ from constraints.txt (pinned, installed): {differ}"
    assert names <= set(installed)


def test_dockerignore_keeps_local_state_out() -> None:
    """The build context is only pyproject.toml, constraints.txt, libs/ and services/."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**"
    assert {ln[1:] for ln in lines if ln.startswith("!")} == {"pyproject.toml", "constraints.txt", "libs/", "services/"}


def test_search_needs_no_url_between_services(compose: dict[str, Any]) -> None:
    """The gateway asks the ingestion service to search over Kafka (threadline.search.*), never over HTTP, so no
    service is told where another one listens."""
    for name in APP_SERVICES:
        env = _env(compose["services"][name])
        assert not {k for k in env if k.startswith("THREADLINE_SEARCH_") and k.endswith("URL")}, name
    assert {"threadline.search.requests", "threadline.search.replies"} <= set(ALL_TOPICS)


def test_the_sandbox_can_create_its_namespaces(compose: dict[str, Any]) -> None:
    """The tool executor asks for namespace isolation (a valid THREADLINE_SANDBOX_ISOLATION), so its container lifts
    what Docker sets by default that makes the sandbox's `unshare` fail: the service would refuse to start."""
    svc = compose["services"]["tool-executor"]
    isolation = Isolation(_env(svc)["THREADLINE_SANDBOX_ISOLATION"])
    assert isolation is not Isolation.PROCESS, "compose documents the sandbox in user namespaces"
    assert "--mount-proc" in _unshare_command(isolation), "the sandbox mounts its own /proc (systempaths below)"
    missing = NAMESPACE_SECURITY_OPT - set(svc.get("security_opt", []))
    assert not missing, f"tool-executor: `unshare` fails in the container without security_opt {sorted(missing)}"


def test_every_topic_the_code_names_is_created() -> None:
    """Every topic constant of threadline_core.topics is in ALL_TOPICS, the list kafka-init (and the services'
    ensure_topics, and /readyz) go by: a topic added without it would be missing on a broker that refuses to
    auto-create topics."""
    named = {value for name, value in vars(topics).items() if name.isupper() and isinstance(value, str)}
    assert named == set(ALL_TOPICS)


def test_qdrant_serves_hybrid_search(compose: dict[str, Any]) -> None:
    """The Qdrant image is recent enough for hybrid file_search with IDF over the vector stores searched (older ones
    fall back to semantic search, or to IDF over every project's chunks)."""
    tag = compose["services"]["qdrant"]["image"].split(":", 1)[1]
    version = tuple(int(n) for n in re.findall(r"\d+", tag)[:2])
    assert version >= SCOPED_IDF_VERSION, tag

"""The deployment files agree with the code: docker-compose.yml, .env.example, the RabbitMQ
definitions and the Kubernetes manifests run real ``fedmq`` commands with real settings,
refer only to things that exist, and declare the topology of protocol/topology.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from fedmq.cli import app
from fedmq.settings import Settings
from protocol import topology
from tests.faults import broker

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
K8S = ROOT / "deploy" / "k8s"
K8S_BUILDS = [K8S / "base", K8S / "overlays" / "edge-gpu"]
FEDMQ_IMAGES = ("fedmq", "fedmq-gpu")
SERVICE_USERS = ("orchestrator", "worker", "gateway", "dashboard", "device")
SETTINGS = {f"FEDMQ_{name.upper()}" for name in Settings.model_fields}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- helpers --------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def is_fedmq(service: dict[str, Any]) -> bool:
    image = str(service.get("image", "")).split(":")[0]
    build = service.get("build") or {}
    dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
    return image in FEDMQ_IMAGES or dockerfile.startswith("deploy/docker/")


def with_defaults(text: str) -> str:
    """Interpolate ``${VAR:-default}`` with its default, as compose does without a .env."""
    return INTERPOLATION.sub(lambda m: m.group(3) or "", text)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {k: v for k, v in pairs}
    return {k: None if v is None else str(v) for k, v in env.items()}


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


@cache
def cli() -> Any:
    """The click group behind the typer app (typer may vendor its own click: duck-typed)."""
    command = typer.main.get_command(app)
    assert hasattr(command, "commands")
    return command


def resolve_command(args: list[str]) -> tuple[Any, list[str]]:
    """The click command ARGS run (descending into groups like ``db``) and its own args."""
    command = cli()
    path = ["fedmq"]
    rest = list(args)
    while hasattr(command, "commands"):
        assert rest, f"`{' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        sub = command.commands.get(name)
        if sub is None:
            raise AssertionError(
                f"`{' '.join([*path, name])}` is not a fedmq command (yet): "
                f"`{' '.join(path)}` has {sorted(command.commands)}"
            )
        command, path = sub, [*path, name]
    return command, rest


def check_fedmq_args(args: list[str]) -> None:
    command, rest = resolve_command(args)
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for arg in rest:
        option = arg.split("=", 1)[0]
        if option.startswith("--"):
            assert option in known, (
                f"`fedmq {' '.join(args)}`: {option} is not an option of this command "
                f"({sorted(o for o in known if o.startswith('--'))})"
            )


@cache
def make_definitions() -> ModuleType:
    return broker.definitions()


def definitions() -> dict[str, Any]:
    import json

    return json.loads(DEFINITIONS.read_text())


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs(paths: list[Path] | None = None) -> list[dict[str, Any]]:
    return [
        doc for path in paths or k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, spec in pod_specs(docs):
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            yield name, c


def kustomize_tool() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def docker_compose_works() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=30, check=False
    )
    return probe.returncode == 0


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification_schema() -> None:
    # The compose plugin is rarely installed where the tests run (CI here has no Docker):
    # check-jsonschema ships the Compose Specification's JSON schema, so this always runs.
    tool = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_accepts_the_file() -> None:
    if not docker_compose_works():
        pytest.skip("the docker CLI's compose plugin is not installed here")
    base = ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE)]
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [*base, *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_compose_has_every_service_of_the_stack() -> None:
    expected = {"rabbitmq", "postgres", "migrate", "orchestrator", "worker", "worker-gpu"}
    expected |= {"gateway", "dashboard", "fleet"}
    assert expected <= set(services())
    assert services()["worker-gpu"].get("profiles") == ["gpu"]


@pytest.mark.parametrize("name", [n for n, s in services().items() if is_fedmq(s)])
def test_compose_service_runs_a_real_fedmq_command(name: str) -> None:
    command = services()[name].get("command")
    assert isinstance(command, list) and command, f"{name}: command must be an exec-form list"
    check_fedmq_args([with_defaults(str(a)) for a in command])


def test_every_fedmq_variable_in_compose_env_example_and_images_is_a_setting() -> None:
    used: dict[str, str] = {}
    for name, service in services().items():
        for var in environment(service):
            used.setdefault(var, f"docker-compose.yml service {name}")
    for m in INTERPOLATION.finditer(COMPOSE.read_text()):
        used.setdefault(m.group(1), "docker-compose.yml interpolation")
    for var in env_example():
        used.setdefault(var, ".env.example")
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("Dockerfile*")):
        for var in re.findall(r"\bFEDMQ_[A-Z0-9_]+", dockerfile.read_text()):
            used.setdefault(var, dockerfile.name)
    unknown = {
        v: where for v, where in used.items() if v.startswith("FEDMQ_") and v not in SETTINGS
    }
    assert not unknown, f"FEDMQ_ variables that are no setting of fedmq.settings: {unknown}"


# Settings compose sets per service (or leaves to the image's own default on purpose).
PER_SERVICE = {
    "FEDMQ_BROKER_ACCOUNTS_URL",  # the orchestrator's alone
    "FEDMQ_DEVICE_BROKER_URL",  # the fleet's alone (`fedmq up` sets it); devices here use their own
    "FEDMQ_REPLICA_ID",  # each orchestrator replica its own (default: host-pid-random)
    # Metrics: on for the services that serve them (a fleet's own worker would take a port).
    "FEDMQ_METRICS_PORT",
    "FEDMQ_METRICS_HOST",
    "FEDMQ_BROKER_URL",
    "FEDMQ_DATABASE_URL",
    "FEDMQ_OPERATOR_TOKEN",
    "FEDMQ_WORKER_DEVICE",
    "FEDMQ_DASHBOARD_HOST",
    "FEDMQ_DASHBOARD_PORT",
    "FEDMQ_GATEWAY_HOST",
    "FEDMQ_GATEWAY_PORT",
    "FEDMQ_GATEWAY_URL",  # for HTTP devices outside compose; the fleet's devices speak AMQP
    "FEDMQ_DATA_DIR",  # the image's working directory
}


def test_every_setting_can_be_set_in_compose() -> None:
    passed = set(compose()["x-fedmq-env"])
    missing = sorted(SETTINGS - passed - PER_SERVICE)
    assert not missing, (
        f"settings compose cannot pass to the services: {missing}; add them to x-fedmq-env "
        "in docker-compose.yml (or to PER_SERVICE here when a service sets them itself)"
    )


def test_fedmq_values_in_compose_and_env_example_are_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {k: v for k, v in env_example().items() if k.startswith("FEDMQ_")}
    for service in services().values():
        for k, v in environment(service).items():
            if k.startswith("FEDMQ_") and v is not None:
                values[k] = with_defaults(v)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    Settings(_env_file=None)  # raises on any invalid value


def test_fedmq_services_get_their_urls_and_only_operators_the_token() -> None:
    for name, service in services().items():
        if not is_fedmq(service):
            continue
        env = environment(service)
        assert "FEDMQ_DATABASE_URL" in env, name
        if name != "migrate":
            assert env.get("FEDMQ_BROKER_URL"), f"{name} needs its own FEDMQ_BROKER_URL"
        has_token = "FEDMQ_OPERATOR_TOKEN" in env
        assert has_token == (name in ("orchestrator", "gateway", "dashboard")), name
    assert environment(services()["worker-gpu"])["FEDMQ_WORKER_DEVICE"] == "cuda"
    assert environment(services()["worker"])["FEDMQ_WORKER_DEVICE"] == "cpu"


def test_depends_on_targets_exist_with_a_sensible_condition() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (long form)"
        for target, spec in depends.items():
            assert target in all_services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), (
                f"{name} -> {target}: condition {condition!r}"
            )
            if condition == "service_healthy":
                assert "healthcheck" in all_services[target], f"{target} has no healthcheck"
            else:
                assert all_services[target].get("restart") == "no", (
                    f"{target} is one-shot: restart must be 'no'"
                )
            assert not all_services[target].get("profiles") or service.get("profiles"), (
                f"{name} (always started) depends on {target}, which only runs in a profile"
            )


def test_long_running_services_restart_and_have_healthchecks() -> None:
    for name, service in services().items():
        if name == "migrate":
            continue
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert "healthcheck" in service or name == "fleet", f"{name} has no healthcheck"


def test_published_ports_do_not_collide() -> None:
    seen: dict[tuple[str, str], str] = {}
    for name, service in services().items():
        for port in service.get("ports") or []:
            parts = with_defaults(str(port)).split(":")
            assert len(parts) in (2, 3), f"{name}: publish {port!r} as [ip:]host:container"
            ip, host = (parts[0], parts[1]) if len(parts) == 3 else ("0.0.0.0", parts[0])
            for (other_ip, other_host), other in seen.items():
                same_ip = ip == other_ip or "0.0.0.0" in (ip, other_ip)
                clash = other_host == host and same_ip
                assert not clash, f"{name} and {other} both publish port {host}"
            seen[(ip, host)] = name
    assert any(h == "8501" for _, h in seen), "the dashboard's port is published"


def test_gpu_worker_reserves_an_nvidia_gpu() -> None:
    devices = services()["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services()["worker-gpu"]["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"


# --- RabbitMQ definitions --------------------------------------------------------------------


def test_definitions_declare_the_topology_of_protocol_topology() -> None:
    d = definitions()
    topo = topology.default_topology()
    vhost = make_definitions().VHOST
    assert {(e["name"], e["type"], e["durable"]) for e in d["exchanges"]} == {
        (e.name, e.type, e.durable) for e in topo.exchanges
    }
    assert {
        (q["name"], q["durable"], q["auto_delete"], tuple(sorted(q["arguments"].items())))
        for q in d["queues"]
    } == {
        (q.name, q.durable, q.auto_delete, tuple(sorted(q.arguments.items()))) for q in topo.queues
    }
    assert {(b["source"], b["destination"], b["routing_key"]) for b in d["bindings"]} == {
        (b.exchange, b.queue, b.routing_key) for b in topo.bindings
    }
    assert {x["vhost"] for x in d["exchanges"] + d["queues"] + d["bindings"]} == {vhost}


def test_definitions_are_what_make_definitions_writes_and_the_k8s_copy_is_identical() -> None:
    md = make_definitions()
    assert DEFINITIONS.read_text() == md.dumps(md.render({})), (
        "stale: run `.venv/bin/python deploy/rabbitmq/make_definitions.py`"
    )
    assert md.K8S_COPY.read_text() == DEFINITIONS.read_text()
    k8s_conf = K8S / "base" / "rabbitmq" / "rabbitmq.conf"
    assert k8s_conf.read_text() == (DEFINITIONS.parent / "rabbitmq.conf").read_text()


def test_each_service_has_its_own_user_without_administrator_rights() -> None:
    d = definitions()
    users = {u["name"]: u for u in d["users"]}
    assert set(SERVICE_USERS) <= set(users)
    assert "guest" not in users
    perms = {(p["user"], p["vhost"]): p for p in d["permissions"]}
    for user in SERVICE_USERS:
        assert users[user]["tags"] == [], f"{user} must not be a management user"
        assert (user, "/") not in perms, f"{user} needs no access to the default vhost"
        p = perms[(user, make_definitions().VHOST)]
        assert ".*" not in (p["configure"], p["write"], p["read"]), f"{user} has full rights"


@pytest.mark.parametrize(
    ("user", "kind", "name", "allowed"),
    [
        ("device", "write", "fedmq.signals", True),
        ("device", "write", "fedmq.updates", False),  # enrollment only: no updates
        ("device", "write", "fedmq.control", False),  # only operators send commands
        ("device", "read", "orchestrator.updates", False),
        ("device", "read", "device.abc", False),  # a client's queue: not the enrollment user's
        ("device", "read", "device.r0123456789abcdef", True),  # a reply queue
        ("device", "configure", "orchestrator.signals", False),
        ("worker", "configure", "fedmq.signals", False),
        ("worker", "read", "aggregate", True),
        ("worker", "read", "abc.celery.pidbox", True),
        ("dashboard", "write", "fedmq.control", True),
        ("dashboard", "write", "fedmq.devices", False),
        ("dashboard", "read", "orchestrator.updates", False),
        # Nobody but the orchestrator may declare (and so delete) its queues or exchanges.
        ("dashboard", "configure", "orchestrator.control", False),
        ("gateway", "configure", "orchestrator.updates", False),
        ("gateway", "configure", "fedmq.signals", False),
        ("gateway", "configure", "device.gw-0123", True),  # its reply and HTTP clients' queues
        ("device", "configure", "fedmq.devices", False),
        ("orchestrator", "read", "orchestrator.updates", True),
        ("orchestrator", "write", "aggregate", True),
        ("orchestrator", "read", "device.abc", False),
        ("orchestrator", "write", "amq.default", True),  # Celery publishes through it
        ("device", "write", "amq.default", False),
        ("gateway", "write", "fedmq.updates", True),
        ("gateway", "write", "fedmq.control", True),  # the paper's autorun routes
        ("gateway", "read", "orchestrator.updates", False),
        ("gateway", "read", "device.abc", True),
    ],
)
def test_permissions_grant_what_the_service_does_and_nothing_else(
    user: str, kind: str, name: str, allowed: bool
) -> None:
    vhost = make_definitions().VHOST
    p = next(p for p in definitions()["permissions"] if (p["user"], p["vhost"]) == (user, vhost))
    assert bool(re.search(p[kind], name)) is allowed


def test_the_shared_device_user_may_only_register() -> None:
    topic = {
        (t["user"], t["exchange"]): t
        for t in definitions()["topic_permissions"]
        if t["user"] == "device"
    }
    reply_key = "r0123456789abcdef"
    client_id = "0123456789abcdef0123456789abcdef"  # what register_client makes (uuid4 hex)
    devices = topic[("device", topology.DEVICES_EXCHANGE)]
    assert re.search(devices["read"], topology.device_routing_key(reply_key))
    assert not re.search(devices["read"], topology.device_routing_key(client_id))
    assert not re.search(devices["read"], topology.broadcast_routing_key("run1"))
    assert not re.search(devices["read"], "#")
    assert not re.search(devices["read"], "device.*")
    signals = topic[("device", topology.SIGNALS_EXCHANGE)]
    assert re.search(signals["write"], topology.signal_routing_key(reply_key))
    assert not re.search(signals["write"], topology.signal_routing_key(client_id))
    updates = topic[("device", topology.UPDATES_EXCHANGE)]
    assert not re.search(updates["write"], topology.update_routing_key("run1", 3, client_id))


def test_the_orchestrator_can_manage_device_users_and_nothing_else_can() -> None:
    d = definitions()
    admins = {u["name"] for u in d["users"] if "administrator" in u["tags"]}
    assert admins == {"admin", "accounts"}
    assert not [p for p in d["permissions"] if p["user"] == "accounts"]  # no AMQP anywhere
    orchestrator = services()["orchestrator"]
    url = with_defaults(environment(orchestrator)["FEDMQ_BROKER_ACCOUNTS_URL"])
    assert url.startswith("http://accounts:accounts-dev-password@rabbitmq:15672")
    for name, service in services().items():
        if name != "orchestrator":
            assert "FEDMQ_BROKER_ACCOUNTS_URL" not in environment(service), name


def broker_urls() -> Iterator[tuple[str, str]]:
    for name, service in services().items():
        url = environment(service).get("FEDMQ_BROKER_URL")
        if url:
            yield f"compose {name}", with_defaults(url)
    for doc in k8s_docs():
        if doc["kind"] == "Secret":
            for key, value in (doc.get("stringData") or {}).items():
                if key.endswith("broker-url"):
                    yield f"k8s secret {key}", value


def test_broker_urls_use_service_users_whose_passwords_match_the_definitions() -> None:
    md = make_definitions()
    hashes = {u["name"]: u["password_hash"] for u in definitions()["users"]}
    seen = set()
    for where, url in broker_urls():
        parts = urlsplit(url)
        assert parts.hostname == "rabbitmq", where
        assert parts.path == f"/{md.VHOST}", f"{where}: vhost {parts.path}"
        assert parts.username in SERVICE_USERS, f"{where}: user {parts.username}"
        assert md.check_password(hashes[parts.username], parts.password or ""), (
            f"{where}: the password is not the one definitions.json was made with"
        )
        seen.add(parts.username)
    assert seen == set(SERVICE_USERS)
    for user in SERVICE_USERS:  # .env.example documents the same passwords
        assert env_example()[f"RABBITMQ_{user.upper()}_PASSWORD"] == md.dev_password(user)


# --- Kubernetes ------------------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_kustomization_resources_components_and_generator_files_exist() -> None:
    assert kustomizations()
    for path in kustomizations():
        k = yaml.safe_load(path.read_text())
        for ref in [*k.get("resources", []), *k.get("components", [])]:
            assert (path.parent / ref).exists(), f"{path}: {ref} does not exist"
        for gen in [*k.get("secretGenerator", []), *k.get("configMapGenerator", [])]:
            for f in gen.get("files", []):
                assert (path.parent / f.split("=", 1)[-1]).is_file(), f"{path}: {f}"


def names_of(docs: list[dict[str, Any]], kind: str) -> set[str]:
    names = {d["metadata"]["name"] for d in docs if d["kind"] == kind}
    for path in kustomizations():
        k = yaml.safe_load(path.read_text())
        key = {"Secret": "secretGenerator", "ConfigMap": "configMapGenerator"}.get(kind)
        names |= {g["name"] for g in k.get(key, [])} if key else set()
    return names


def secret_keys_of(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set((d.get("stringData") or {}) | (d.get("data") or {}))
        for d in docs
        if d["kind"] == "Secret"
    }


def test_k8s_container_references_point_at_objects_that_exist() -> None:
    docs = k8s_docs()
    secrets, configmaps = names_of(docs, "Secret"), names_of(docs, "ConfigMap")
    secret_keys = secret_keys_of(docs)
    for workload, c in containers(docs):
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, workload
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, workload
        for env in c.get("env", []):
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secret_keys[ref["name"]], f"{workload}: {ref}"


def test_k8s_volumes_point_at_objects_that_exist() -> None:
    docs = k8s_docs()
    secrets, configmaps = names_of(docs, "Secret"), names_of(docs, "ConfigMap")
    for workload, spec in pod_specs(docs):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, workload
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, workload


def test_k8s_autoscalers_point_at_objects_that_exist() -> None:
    docs = k8s_docs()
    secret_keys = secret_keys_of(docs)
    deployments = names_of(docs, "Deployment")
    auth = names_of(docs, "TriggerAuthentication")
    for d in docs:
        if d["kind"] == "ScaledObject":
            assert d["spec"]["scaleTargetRef"]["name"] in deployments
            for trigger in d["spec"]["triggers"]:
                assert trigger["authenticationRef"]["name"] in auth
                assert trigger["metadata"]["queueName"] in ("aggregate", "evaluate", "edge")
        if d["kind"] == "TriggerAuthentication":
            for ref in d["spec"]["secretTargetRef"]:
                assert ref["key"] in secret_keys[ref["name"]]


def test_k8s_services_select_the_pods_of_a_workload() -> None:
    docs = k8s_docs()
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    for d in docs:
        if d["kind"] == "Service":
            selector = d["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), (
                f"Service {d['metadata']['name']} selects no pods: {selector}"
            )
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()


def fedmq_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, c) for n, c in containers(docs) if c["image"].split(":")[0] in FEDMQ_IMAGES]


@pytest.mark.parametrize("workload", sorted({n for n, _ in fedmq_containers(k8s_docs())}))
def test_k8s_workload_runs_a_real_fedmq_command(workload: str) -> None:
    for name, c in fedmq_containers(k8s_docs()):
        if name == workload:
            check_fedmq_args([str(a) for a in c["args"]])


def test_every_fedmq_variable_in_k8s_is_a_valid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = k8s_docs()
    used = {
        env["name"]: env.get("value")
        for _, c in containers(docs)
        for env in c.get("env", [])
        if env["name"].startswith("FEDMQ_")
    }
    for d in docs:
        if d["kind"] == "ConfigMap":
            used |= {k: v for k, v in d["data"].items()}
    assert used
    unknown = sorted(v for v in used if v not in SETTINGS)
    assert not unknown, f"FEDMQ_ variables that are no setting of fedmq.settings: {unknown}"
    for k, v in used.items():
        if v is not None:
            monkeypatch.setenv(k, str(v))
    Settings(_env_file=None)


def test_edge_gpu_overlay_schedules_gpu_workers_on_gpu_nodes() -> None:
    docs = k8s_docs(sorted((K8S / "overlays" / "edge-gpu").glob("*.yaml")))
    gpu = next(d for d in docs if d["kind"] == "Deployment")
    spec = gpu["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and spec["tolerations"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FEDMQ_WORKER_DEVICE"] == "cuda"
    assert "edge" in container["args"][container["args"].index("--queues") + 1]


@pytest.mark.parametrize("build", K8S_BUILDS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_kustomize_builds_and_the_result_is_consistent(build: Path) -> None:
    tool = kustomize_tool()
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    result = subprocess.run(
        [*tool, str(build)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Job", "Service", "ConfigMap", "Secret"} <= kinds
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    # Generated names carry a hash suffix; kustomize must have rewritten the references.
    for workload, spec in pod_specs(docs):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names, workload
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, workload
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "fedmq", d["metadata"]["name"]

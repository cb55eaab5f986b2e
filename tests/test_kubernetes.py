"""Static checks of the Kubernetes manifests in deploy/: rendered with a small kustomize, then inspected.

The renderer implements the subset of kustomize that deploy/ uses (resources, components, namespace,
labels, strategic-merge patches incl. `$patch: delete`, replicas, images) and refuses anything else.
When `kubectl kustomize` is on the machine, its output must equal ours, so the renderer cannot drift.
"""

import copy
import importlib
import inspect
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas
from pydantic import AliasChoices

from threadline_core.runtime import WATCHDOG_MARGIN_SECONDS
from threadline_core.settings import CoreSettings
from threadline_core.topics import ALL_TOPICS
from threadline_sandbox import Isolation
from threadline_sandbox.runner import _unshare_command

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["dev", "prod", "prod-keda"]
KUBERNETES_RELEASES = ["1.25.0", "1.37.0"]
"""The oldest and newest Kubernetes releases the manifests are checked against (kubernetes-validate's schemas)."""
CUSTOM_KINDS = {"ScaledObject"}
"""Kinds of custom resources (KEDA's), which the API schemas do not cover; their own test checks them."""

SERVICES = {"gateway": "gateway", "run-orchestrator": "run_orchestrator", "tool-executor": "tool_executor",
            "ingestion": "ingestion", "notifier": "notifier"}
"""Deployment name -> Python package run by `python -m`."""

CONSUMED_TOPICS = {"run_orchestrator": {"threadline.run.commands", "threadline.model.requests"},
                   "tool_executor": {"threadline.tool.requests"},
                   "ingestion": {"threadline.ingestion.requests", "threadline.search.requests"},
                   "notifier": {"threadline.events", "threadline.webhook.commands"}}
"""The topics each consumer group reads (docs/DESIGN.md)."""
QDRANT_USERS = {"tool_executor", "ingestion"}
"""Packages that search or index vectors: they need a Qdrant server (local mode is single-process)."""

Doc = dict[str, Any]

# ---------------------------------------------------------------------------------------------------
# A minimal kustomize
# ---------------------------------------------------------------------------------------------------

_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "patches", "replicas",
                   "images"}
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
               "topologySpreadConstraints": "topologyKey"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                   "StorageClass", "PersistentVolume"}
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _smp(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge of `patch` into `base` (maps merge, keyed lists merge, other lists are replaced)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _smp(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in _MERGE_KEYS:
        mk = _MERGE_KEYS[key]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = [i for i, b in enumerate(out_list) if isinstance(b, dict) and b.get(mk) == item.get(mk)]
            if item.get("$patch") == "delete":
                out_list = [b for i, b in enumerate(out_list) if i not in match]
            elif match:
                out_list[match[0]] = _smp(out_list[match[0]], item, None)
            else:
                raise NotImplementedError(f"adding list items by patch ({key}) is not supported by this renderer")
        return out_list
    return copy.deepcopy(patch)


def _same_target(res: Doc, patch: Doc) -> bool:
    if res["kind"] != patch["kind"] or res["metadata"]["name"] != patch["metadata"]["name"]:
        return False
    if res["apiVersion"].split("/")[0] != patch["apiVersion"].split("/")[0]:
        return False
    ns = patch["metadata"].get("namespace")
    return ns is None or ns == res["metadata"].get("namespace")


def _apply_patches(resources: list[Doc], folder: Path, patches: list[Doc]) -> list[Doc]:
    for entry in patches:
        assert set(entry) == {"path"}, f"only `patches: - path:` is supported, got {entry}"
        for patch in _load_docs(folder / entry["path"]):
            targets = [i for i, r in enumerate(resources) if _same_target(r, patch)]
            assert len(targets) == 1, f"patch {entry['path']} {patch['kind']}/{patch['metadata']['name']} " \
                                      f"matches {len(targets)} resources"
            if patch.get("$patch") == "delete":
                del resources[targets[0]]
            else:
                resources[targets[0]] = _smp(resources[targets[0]], {k: v for k, v in patch.items()
                                                                       if k != "$patch"})
    return resources


def _pod_templates(res: Doc) -> list[Doc]:
    if res["kind"] in _POD_TEMPLATE_KINDS:
        return [res["spec"]["template"]]
    if res["kind"] == "CronJob":
        return [res["spec"]["jobTemplate"]["spec"]["template"]]
    return []


def _apply_labels(resources: list[Doc], labels: list[Doc]) -> None:
    for entry in labels:
        assert not entry.get("includeSelectors", False), "includeSelectors: true is not supported"
        assert set(entry) <= {"pairs", "includeSelectors", "includeTemplates"}, entry
        for res in resources:
            res["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates"):
                for template in _pod_templates(res):
                    template.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])


def _apply_images(resources: list[Doc], images: list[Doc]) -> None:
    for res in resources:
        for template in _pod_templates(res):
            spec = template["spec"]
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name = container["image"].split("@")[0]
                if ":" in name.rsplit("/", 1)[-1]:
                    name = name.rsplit(":", 1)[0]
                for image in images:
                    if image["name"] == name:
                        container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def _apply_transformers(resources: list[Doc], folder: Path, kust: Doc) -> list[Doc]:
    """Transformers in kustomize's order: patches, namespace, labels, replicas, images."""
    resources = _apply_patches(resources, folder, kust.get("patches", []))
    if "namespace" in kust:
        for res in resources:
            if res["kind"] not in _CLUSTER_SCOPED:
                res["metadata"]["namespace"] = kust["namespace"]
    _apply_labels(resources, kust.get("labels", []))
    for entry in kust.get("replicas", []):
        hits = [r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"] == entry["name"]]
        assert hits, f"replicas: no Deployment {entry['name']}"
        for res in hits:
            res["spec"]["replicas"] = entry["count"]
    _apply_images(resources, kust.get("images", []))
    return resources


def render(folder: Path) -> list[Doc]:
    """Render a kustomization directory (the subset of kustomize deploy/ uses)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kust) - _SUPPORTED_KEYS
    assert not unsupported, f"{folder}: this renderer does not support {unsupported}"
    resources: list[Doc] = []
    for entry in kust.get("resources", []):
        path = folder / entry
        resources += render(path) if path.is_dir() else _load_docs(path)
    for entry in kust.get("components", []):
        component_dir = folder / entry
        component = yaml.safe_load((component_dir / "kustomization.yaml").read_text())
        assert component["kind"] == "Component"
        assert not set(component) - _SUPPORTED_KEYS
        for res_entry in component.get("resources", []):
            resources += _load_docs(component_dir / res_entry)
        resources = _apply_transformers(resources, component_dir, component)
    return _apply_transformers(resources, folder, kust)


def _index(docs: list[Doc]) -> dict[tuple[str, str, str], Doc]:
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """(overlay name, rendered documents)."""
    return request.param, render(DEPLOY / "overlays" / request.param)


@pytest.mark.parametrize("release", KUBERNETES_RELEASES)
def test_manifests_are_valid_kubernetes_objects(overlay: tuple[str, list[Doc]], release: str) -> None:
    """Every object validates against the Kubernetes API's own schemas, unknown fields refused, so a misspelt or
    misplaced field fails here rather than at `kubectl apply`."""
    _, docs = overlay
    checked, problems = 0, []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_schemas.validate(doc, release, strict=True)
        except kubernetes_schemas.SchemaNotFoundError:
            assert doc["kind"] in CUSTOM_KINDS, f"{name}: no schema in Kubernetes {release}"
            continue
        except jsonschema.ValidationError as error:
            problems.append(f"{name}: {error.message} at {list(error.path)}")
        checked += 1
    assert not problems, f"not valid in Kubernetes {release}: {problems}"
    assert checked >= len(SERVICES) * 2  # at least each service's Deployment and Service


# ---------------------------------------------------------------------------------------------------
# What the services read
# ---------------------------------------------------------------------------------------------------


def settings_class(package: str) -> type[CoreSettings]:
    """The CoreSettings subclass defined in `<package>.settings`."""
    module = importlib.import_module(f"{package}.settings")
    found = [c for _, c in inspect.getmembers(module, inspect.isclass)
             if issubclass(c, CoreSettings) and c is not CoreSettings and c.__module__ == module.__name__]
    assert len(found) == 1, f"{package}.settings should define one settings class, found {found}"
    return found[0]


def accepted_env(cls: type[CoreSettings]) -> dict[str, str]:
    """Every environment variable name the settings class reads (upper case) -> field name."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            choices = [c for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            choices = [alias]
        else:
            choices = [f"{prefix}{field.alias or field_name}"]
        for choice in choices:
            names[choice.upper()] = field_name
    return names


def _container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container expected"
    return containers[0]


def _env(container: Doc, configmaps: dict[str, Doc], secrets: dict[str, Doc]) -> dict[str, Any]:
    """Name -> literal value (or a marker for values from refs) of the container's environment."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            env.update(secrets.get(source["secretRef"]["name"], {}).get("stringData", {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def _grace(configmaps: dict[str, Doc], env: dict[str, Any]) -> float:
    value = env.get("THREADLINE_SHUTDOWN_GRACE_SECONDS")
    return float(value) if isinstance(value, str) else float(CoreSettings.model_fields["shutdown_grace_seconds"]
                                                                 .default)


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    """Our renderer's output equals `kubectl kustomize` (when kubectl is installed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the built-in renderer is used alone")
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / name)], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("kubectl has no kustomize")
    assert proc.returncode == 0, proc.stderr
    theirs = _index([d for d in yaml.safe_load_all(proc.stdout) if d])
    ours = _index(render(DEPLOY / "overlays" / name))
    assert sorted(ours) == sorted(theirs)
    for key, doc in ours.items():
        assert doc == theirs[key], f"{key} differs from kubectl kustomize"


def test_every_overlay_renders_every_service(overlay: tuple[str, list[Doc]]) -> None:
    """Each overlay has a namespace, a ConfigMap, the migration Job and a Deployment per service."""
    name, docs = overlay
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert len(namespaces) == 1
    for doc in docs:
        if doc["kind"] not in _CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == namespaces[0], (name, doc["kind"], doc["metadata"]["name"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "threadline"
    assert ("ConfigMap", "threadline-config") in kinds
    assert ("Job", "migrate") in kinds
    assert {n for k, n in kinds if k == "Deployment"} == set(SERVICES)
    has_secret = ("Secret", "threadline-secrets") in kinds
    assert has_secret == (name == "dev"), "dev ships placeholder secrets; prod expects the real Secret to exist"


def test_deployments_are_probed_limited_and_non_root(overlay: tuple[str, list[Doc]]) -> None:
    """Probes on /healthz and /readyz at the service's port, requests/limits, non-root, a tagged image."""
    _, docs = overlay
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        name = dep["metadata"]["name"]
        package = SERVICES[name]
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        container = _container(dep)
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert container["args"][:1] == [package]
        assert ":" in container["image"].rsplit("/", 1)[-1], f"{name}: image must carry a tag"
        env = _env(container, configmaps, secrets)
        port = int(env.get("THREADLINE_PORT", settings_class(package).model_fields["port"].default))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port in ports.values(), f"{name}: container port must be the service's THREADLINE_PORT {port}"
        annotations = pod["metadata"].get("annotations", {})
        assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] == "/metrics", \
            f"{name}: Prometheus scrapes /metrics on the service's port"
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (name, probe)
            assert ports.get(get["port"], get["port"]) == port, (name, probe)
        assert env.get("THREADLINE_HOST") == "0.0.0.0", f"{name} must bind all interfaces in a pod"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), "writable /tmp"
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_seconds = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        grace = _grace(configmaps, env)
        assert spec["terminationGracePeriodSeconds"] > grace + pre_stop_seconds + WATCHDOG_MARGIN_SECONDS, \
            f"{name}: terminationGracePeriodSeconds must exceed THREADLINE_SHUTDOWN_GRACE_SECONDS + preStop + the " \
            "watchdog's margin (a hung service dumps its threads before it is killed)"


def test_env_names_are_read_by_the_service_settings(overlay: tuple[str, list[Doc]]) -> None:
    """Every variable a pod gets is a field of that service's settings; every ref points at a real key."""
    name, docs = overlay
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    # prod removes the placeholder Secret: the keys it must hold are those of the base.
    base_secret = next(d for d in _load_docs(DEPLOY / "base" / "secret.yaml"))
    secret_keys = {"threadline-secrets": set(base_secret["stringData"])}
    for doc in secrets.values():
        assert set(doc.get("stringData", {})) <= secret_keys[doc["metadata"]["name"]]
    workloads = [(d, SERVICES[d["metadata"]["name"]]) for d in docs if d["kind"] == "Deployment"]
    workloads += [(d, "gateway") for d in docs if d["kind"] == "Job"]
    for workload, package in workloads:
        accepted = accepted_env(settings_class(package))
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env = _env(container, configmaps, secrets)
        unknown = sorted(set(env) - set(accepted))
        assert not unknown, f"{name}/{workload['metadata']['name']}: {unknown} not read by {package} settings"
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["key"] in secret_keys[ref["secretKeyRef"]["name"]], var
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in configmaps[ref["configMapKeyRef"]["name"]]["data"], var
        assert "DATABASE_URL" in env, f"{workload['metadata']['name']} needs the database"
        if workload["kind"] == "Deployment":
            assert env.get("KAFKA_BOOTSTRAP_SERVERS"), f"{workload['metadata']['name']} needs the broker"
        if package in QDRANT_USERS:  # else local mode, in a folder under the read-only root, for one process only
            assert str(env.get("QDRANT_URL", "")).startswith("http"), f"{package} needs the Qdrant server"
    gateway = _deployment(docs, "gateway")
    assert "THREADLINE_API_KEY" in _env(_container(gateway), configmaps, secrets)
    for doc in configmaps.values():
        for key, value in doc.get("data", {}).items():
            assert "CHANGE-ME" not in value and "sk-" not in value, f"secret-looking {key} in a ConfigMap"


def test_each_deployment_has_service_pdb_and_autoscaler(overlay: tuple[str, list[Doc]]) -> None:
    """Service, PodDisruptionBudget and an HPA (CPU) or a KEDA ScaledObject for every Deployment."""
    name, docs = overlay
    partitions = int(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["THREADLINE_TOPIC_PARTITIONS"])
    by_kind: dict[str, dict[str, Doc]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    for dep_name, dep in by_kind["Deployment"].items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        container = _container(dep)
        service = by_kind["Service"][dep_name]
        assert service["spec"]["selector"].items() <= labels.items()
        port_names = {p["name"] for p in container["ports"]}
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
        pdb = by_kind["PodDisruptionBudget"][dep_name]
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])
        hpa = by_kind.get("HorizontalPodAutoscaler", {}).get(dep_name)
        scaled = by_kind.get("ScaledObject", {}).get(dep_name)
        assert (hpa is None) != (scaled is None), f"{name}/{dep_name}: exactly one autoscaler"
        consumer = SERVICES[dep_name] in CONSUMED_TOPICS
        if hpa is not None:
            assert hpa["apiVersion"] == "autoscaling/v2"
            assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep_name}
            assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
            assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
            assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
            if consumer:
                assert hpa["spec"]["maxReplicas"] <= partitions, f"{dep_name}: more replicas than partitions"
        if scaled is not None:
            assert consumer, f"{dep_name} consumes no topic; it cannot scale on lag"
            assert scaled["spec"]["scaleTargetRef"]["name"] == dep_name
            assert scaled["spec"]["maxReplicaCount"] <= partitions


def test_keda_scaled_objects_watch_the_real_consumer_groups() -> None:
    """The optional KEDA triggers name each service's consumer group, topic and the configured broker."""
    docs = render(DEPLOY / "overlays" / "prod-keda")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert {d["metadata"]["name"] for d in scaled} == {n for n, p in SERVICES.items() if p in CONSUMED_TOPICS}
    for doc in scaled:
        package = SERVICES[doc["metadata"]["name"]]
        group = importlib.import_module(f"{package}.app").CONSUMER_GROUP
        kafka = [t for t in doc["spec"]["triggers"] if t["type"] == "kafka"]
        assert len(kafka) == 1
        meta = kafka[0]["metadata"]
        assert meta["consumerGroup"] == group
        assert meta["topic"] in CONSUMED_TOPICS[package] and meta["topic"] in ALL_TOPICS
        assert meta["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"]
        assert int(meta["lagThreshold"]) > 0


def test_migration_job_runs_gateway_migrate(overlay: tuple[str, list[Doc]]) -> None:
    """The Job runs `python -m gateway migrate` once, non-root, and is retried on failure."""
    _, docs = overlay
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["gateway", "migrate"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    deployment_images = {_container(d)["image"] for d in docs if d["kind"] == "Deployment"}
    assert deployment_images == {container["image"]}, "one image for every service and the migration"


def test_renderer_applies_patches_and_deletes() -> None:
    """The renderer itself: keyed list merge, replacement, deletion markers."""
    base = {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b", "image": "y"}],
                     "keep": 1}}
    patch = {"spec": {"containers": [{"name": "b", "image": "z", "args": ["2"]}], "keep": None}}
    merged = _smp(base, patch)
    assert merged == {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]},
                                              {"name": "b", "image": "z", "args": ["2"]}]}}
    assert base["spec"]["keep"] == 1, "inputs are not mutated"
    with pytest.raises(NotImplementedError):
        _smp(base, {"spec": {"containers": [{"name": "c", "image": "w"}]}})


def test_search_needs_no_url_between_services(overlay: tuple[str, list[Doc]]) -> None:
    """The gateway asks the ingestion service to search over Kafka, never over HTTP: no service is told where
    another listens, in its env or the ConfigMap."""
    _, docs = overlay
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    names = set(config) | {v["name"] for d in docs if d["kind"] == "Deployment" for v in _container(d).get("env", [])}
    assert not {n for n in names if n.startswith("THREADLINE_SEARCH_") and n.endswith("URL")}


_PSS_LEVELS = ["restricted", "baseline", "privileged"]
"""Pod Security Standards levels, strictest first."""
_BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                          "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def _pod_security_level(template: Doc) -> str:
    """The strictest Pod Security Standards level a pod template meets (the controls deploy/ could touch)."""
    spec = template["spec"]
    containers = spec["containers"] + spec.get("initContainers", [])
    pod_sc = spec.get("securityContext", {})
    contexts = [c.get("securityContext", {}) for c in containers]
    seccomp = [sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") for sc in contexts]
    added = {cap for sc in contexts for cap in sc.get("capabilities", {}).get("add", [])}
    annotations = template.get("metadata", {}).get("annotations", {})
    apparmor = {v for k, v in annotations.items() if k.startswith("container.apparmor.security.beta.kubernetes.io/")}
    if (any(spec.get(f"host{ns}") for ns in ("Network", "PID", "IPC")) or any(sc.get("privileged") for sc in contexts)
            or "Unconfined" in seccomp or not added <= _BASELINE_CAPABILITIES
            or any(sc.get("procMount", "Default") != "Default" for sc in contexts)
            or any(v != "runtime/default" and not v.startswith("localhost/") for v in apparmor)
            or any("hostPath" in v for v in spec.get("volumes", []))
            or any(p.get("hostPort") for c in containers for p in c.get("ports", []))):
        return "privileged"
    restricted = (all(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True for sc in contexts)
                  and all(sc.get("runAsUser", pod_sc.get("runAsUser")) != 0 for sc in contexts)
                  and all(sc.get("allowPrivilegeEscalation") is False for sc in contexts)
                  and all("ALL" in sc.get("capabilities", {}).get("drop", []) for sc in contexts)
                  and added <= {"NET_BIND_SERVICE"} and all(t in ("RuntimeDefault", "Localhost") for t in seccomp)
                  and all(set(v) - {"name"} <= _RESTRICTED_VOLUMES for v in spec.get("volumes", [])))
    return "restricted" if restricted else "baseline"


def test_the_namespace_admits_every_pod_and_warns_of_any_below_restricted(overlay: tuple[str, list[Doc]]) -> None:
    """Pod Security admission: the namespace's enforced level admits every pod (else its pods are never created);
    only the tool executor, whose sandbox needs user namespaces (seccomp Unconfined), is below restricted."""
    _, docs = overlay
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    enforced = _PSS_LEVELS.index(labels["pod-security.kubernetes.io/enforce"])
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    levels = {res["metadata"]["name"]: _pod_security_level(template)
              for res in docs for template in _pod_templates(res)}
    assert {name: level for name, level in levels.items() if level != "restricted"} == {"tool-executor": "privileged"}
    assert all(_PSS_LEVELS.index(level) <= enforced for level in levels.values()), (labels, levels)
    template = _deployment(docs, "tool-executor")["spec"]["template"]
    spec = template["spec"]
    confined = {"metadata": {}, "spec": {
        **spec, "securityContext": {**spec["securityContext"], "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{**c, "securityContext": {k: v for k, v in c["securityContext"].items() if k != "procMount"}}
                       for c in spec["containers"]]}}
    assert _pod_security_level(confined) == "restricted", \
        "the tool executor should be below restricted for its sandbox's seccomp, AppArmor and /proc alone"


def test_the_sandbox_pod_can_create_its_namespaces(overlay: tuple[str, list[Doc]]) -> None:
    """The tool executor asks for namespace isolation (a valid THREADLINE_SANDBOX_ISOLATION), and its sandbox runs
    `unshare --user --pid --mount --mount-proc`, which fails (and the service refuses to start) unless the pod lifts
    the runtime's default seccomp profile (the unshare), its AppArmor profile (the mounts) and its masked /proc paths
    (the kernel refuses a fresh /proc as too revealing): `procMount: Unmasked`, which needs `hostUsers: false`."""
    _, docs = overlay
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    template = _deployment(docs, "tool-executor")["spec"]["template"]
    spec = template["spec"]
    container = _container(_deployment(docs, "tool-executor"))
    isolation = Isolation(_env(container, configmaps, secrets)["THREADLINE_SANDBOX_ISOLATION"])
    assert isolation is not Isolation.PROCESS, "deploy/README.md documents the sandbox in user namespaces"
    assert "--mount-proc" in _unshare_command(isolation)
    context = container.get("securityContext", {})
    seccomp = context.get("seccompProfile", spec["securityContext"].get("seccompProfile", {}))
    assert seccomp.get("type") == "Unconfined"
    apparmor = template["metadata"].get("annotations", {})
    assert apparmor.get(f"container.apparmor.security.beta.kubernetes.io/{container['name']}") == "unconfined"
    assert context.get("procMount") == "Unmasked", "the default (masked) /proc makes the sandbox's /proc mount fail"
    assert spec.get("hostUsers") is False, "the API refuses procMount: Unmasked unless hostUsers is false"


def _deployment(docs: list[Doc], name: str) -> Doc:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def _pod_spec(docs: list[Doc], name: str) -> Doc:
    spec: Doc = _deployment(docs, name)["spec"]["template"]["spec"]
    return spec


def test_topics_are_replicated_where_the_cluster_has_brokers_to_spare(overlay: tuple[str, list[Doc]]) -> None:
    """Production topics get 3 replicas (one broker lost loses nothing; acks=all meets min.insync.replicas 2); the
    dev overlay's single broker could not hold more than 1."""
    name, docs = overlay
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert int(config["THREADLINE_TOPIC_REPLICATION_FACTOR"]) == (1 if name == "dev" else 3)


PARSER_UNCOUNTED_MB = 1100
"""Address space a warm parser maps beyond what it holds resident (measured: ~1.6 GB mapped, ~0.5 GB resident)."""
INGESTION_SERVICE_MB = 800
"""The ingestion service itself, resident, after embedding."""


def _megabytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else float(quantity) / 2**20


def test_ingestion_parsers_are_capped_inside_the_pods_memory_limit(overlay: tuple[str, list[Doc]]) -> None:
    """Parsers at their address-space cap (THREADLINE_INGESTION_PARSE_MEMORY_MB) and the service fit the container's
    limit, so a file too big to parse fails as invalid_file instead of the kernel killing the pod (and the next
    replica, to which the file's unfinished command goes)."""
    _, docs = overlay
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    container = _container(_deployment(docs, "ingestion"))
    env = _env(container, configmaps, secrets)
    fields = settings_class("ingestion").model_fields
    workers = int(env.get("THREADLINE_INGESTION_PARSE_WORKERS", fields["ingestion_parse_workers"].default))
    cap = int(env.get("THREADLINE_INGESTION_PARSE_MEMORY_MB", fields["ingestion_parse_memory_mb"].default))
    limit = _megabytes(container["resources"]["limits"]["memory"])
    assert cap > PARSER_UNCOUNTED_MB + 1000, "a parser needs room beyond what it maps when warm"
    assert workers * (cap - PARSER_UNCOUNTED_MB) + INGESTION_SERVICE_MB <= limit, (workers, cap, limit)


SCRATCH_SLACK_MB = 64
"""The rest of a sandbox's scratch folder (its config, the supervisor's control files) and the service's own /tmp."""


def test_tool_executor_scratch_fits_its_volume(overlay: tuple[str, list[Doc]]) -> None:
    """Each sandbox running at once (THREADLINE_MAX_CONCURRENT_TOOL_CALLS) writes its input files (up to
    THREADLINE_SANDBOX_INPUT_MAX_MB) and the files its code made (up to twice THREADLINE_SANDBOX_MAX_FILE_MB) into a
    scratch folder under THREADLINE_SANDBOX_DIR (empty: /tmp); an emptyDir past its sizeLimit gets the pod evicted,
    with every call in hand."""
    _, docs = overlay
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    deployment = _deployment(docs, "tool-executor")
    container = _container(deployment)
    env = _env(container, configmaps, secrets)
    fields = settings_class("tool_executor").model_fields

    def setting(name: str) -> str:
        value = env.get(f"THREADLINE_{name.upper()}", fields[name].default)
        return str(value)

    calls = int(setting("max_concurrent_tool_calls"))
    per_call = int(setting("sandbox_input_max_mb")) + 2 * int(setting("sandbox_max_file_mb"))
    scratch = setting("sandbox_dir") or "/tmp"
    mounts = [m for m in container["volumeMounts"] if scratch == m["mountPath"] or scratch.startswith(
        m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"the sandbox's scratch folder {scratch} must be on a writable volume (read-only root filesystem)"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    limit = volume.get("emptyDir", {}).get("sizeLimit")
    if limit is not None:
        assert _megabytes(limit) >= calls * per_call + SCRATCH_SLACK_MB, (calls, per_call, limit)

"""Offline checks of everything under infra/: no cluster, no Docker daemon, no network.

* Kubernetes manifests (infra/k8s, recursively, except the vendored schemas in crds/): built-in
  kinds against the Kubernetes JSON schemas that ``kubernetes-validate`` ships (strict: unknown
  fields fail); KubeRay's RayService and RayJob against the CRD schemas vendored in infra/k8s/crds
  with ``jsonschema``, each Ray cluster spec against both vendored KubeRay versions.
* Policy that a schema cannot express: non-root, no privilege escalation, all capabilities
  dropped, read-only root filesystems, requests and limits, pinned images, credentials only through
  secretKeyRef, probes, matching selectors, a NetworkPolicy that keeps the metadata endpoint out.
* The Serve config (infra/serve/segmenter.yaml) against Ray Serve's own schema, and equal to the
  RayService's serveConfigV2.
* The compose stack: YAML, pinned images, every variable declared in .env.example with secrets
  left empty, healthchecks, the migration gate, ports on 127.0.0.1.
* The Dockerfile: multi-stage, non-root USER, HEALTHCHECK, no secret-looking ENV/ARG with a value,
  versions in step with the Makefile and the manifests; .dockerignore is an allowlist.
* No secret value committed anywhere in infra/.
* The container health-check script against a loopback HTTP server.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
CRDS = K8S / "crds"
COMPOSE = INFRA / "compose" / "docker-compose.yml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
SERVE_CONFIG = INFRA / "serve" / "segmenter.yaml"
HEALTHCHECK = INFRA / "docker" / "healthcheck.py"

K8S_VERSION = "1.33.0"
"""Kubernetes version the built-in kinds are validated against (kubernetes-validate ships 1.25-1.37)."""

K8S_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"
RAY_CRD_SCHEMAS = {
    "RayService": CRDS / "ray.io_rayservices.v1.schema.yaml",
    "RayJob": CRDS / "ray.io_rayjobs.v1.schema.yaml",
}
RAY_CLUSTER_FIELD = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}

SECRET_NAME = re.compile(
    r"(?i)(password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)"
)
PLACEHOLDER = re.compile(r"^(CHANGE-ME|changeme|<[^>]*>|\$\{[^}]*\}|\$\([^)]*\))$")


# --- loading ---------------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml") if CRDS not in p.parents)


@cache
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(id, document) for every Kubernetes document; the id is 'path#index kind/name'."""
    out = []
    for path in _manifest_files():
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            name = doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName")
            out.append((f"{path.relative_to(ROOT)}#{index} {doc.get('kind')}/{name}", doc))
    return tuple(out)


def _of_kind(*kinds: str) -> list[tuple[str, dict[str, Any]]]:
    return [(i, d) for i, d in _manifests() if d.get("kind") in kinds]


def _params(items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    return [pytest.param(doc, id=ident) for ident, doc in items]


BUILTIN = [(i, d) for i, d in _manifests() if not d.get("apiVersion", "").startswith("ray.io/")]
RAY = _of_kind("RayService", "RayJob")


@cache
def _k8s_definitions() -> dict[str, Any]:
    schema_dir = f"v{K8S_VERSION}-local-strict"
    path = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / schema_dir
        / "_definitions.json"
    )
    return json.loads(path.read_text())


def _strict(schema: Any) -> Any:
    """What strict field validation does to a structural CRD schema: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_schema(kind: str) -> dict[str, Any]:
    return _strict(yaml.safe_load(RAY_CRD_SCHEMAS[kind].read_text()))


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    registry = referencing.Registry().with_resource(
        K8S_DEFINITIONS_URI, referencing.Resource.from_contents(_k8s_definitions())
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(schema: dict[str, Any], instance: Any) -> list[str]:
    found = sorted(_validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def _cluster_spec_schema(kind: str) -> dict[str, Any]:
    return _crd_schema(kind)["properties"]["spec"]["properties"][RAY_CLUSTER_FIELD[kind]]


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod this document defines."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "template", spec["template"]["spec"]
    elif kind in ("RayService", "RayJob"):
        cluster = spec[RAY_CLUSTER_FIELD[kind]]
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]["spec"]
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]["spec"]


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _images_everywhere() -> list[tuple[str, str]]:
    out = []
    for ident, doc in _manifests():
        for where, pod in _pod_templates(doc) if doc["kind"] in _POD_KINDS else ():
            out += [(f"{ident} {where}", c["image"]) for c in _containers(pod)]
    return out


_POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "RayService", "RayJob")


def _pinned(image: str) -> bool:
    """A tag other than 'latest' (or a digest)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text()))


# --- Kubernetes: schemas -------------------------------------------------------------------------


def test_manifests_exist_and_are_namespaced() -> None:
    kinds = {d["kind"] for _, d in _manifests()}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "RayService",
        "RayJob",
    } <= kinds
    for ident, doc in _manifests():
        assert doc.get("apiVersion") and doc.get("kind"), ident
        meta = doc.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), ident
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == "seemly", f"{ident}: namespace"
        assert "status" not in doc, f"{ident}: a manifest must not set status"


@pytest.mark.parametrize("doc", _params(BUILTIN))
def test_builtin_resources_match_kubernetes_schema(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path))
        pytest.fail(f"{where}: {exc.message}")


@pytest.mark.parametrize("doc", _params(RAY))
def test_kuberay_resources_match_crd_schema(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(_crd_schema(doc["kind"]), doc) == []


@pytest.mark.parametrize("doc", _params(RAY))
@pytest.mark.parametrize("other", sorted(RAY_CRD_SCHEMAS))
def test_ray_cluster_specs_fit_both_kuberay_versions(doc: dict[str, Any], other: str) -> None:
    """The vendored CRDs are KubeRay 1.2 (RayJob) and a recent master (RayService): a cluster spec
    valid against both uses only fields that every KubeRay from 1.2 on understands."""
    cluster = doc["spec"][RAY_CLUSTER_FIELD[doc["kind"]]]
    assert _errors(_cluster_spec_schema(other), cluster) == []


def test_validators_do_reject_bad_manifests() -> None:
    """The validation above is only worth something if it fails on broken input."""
    service = copy.deepcopy(_of_kind("RayService")[0][1])
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["tempalte"] = broken["spec"]["rayClusterConfig"][
        "headGroupSpec"
    ].pop("template")
    errors = _errors(_crd_schema("RayService"), broken)
    assert any("'template' is a required property" in e for e in errors), errors
    assert any("tempalte" in e for e in errors), errors

    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert _errors(_crd_schema("RayService"), broken)

    broken = copy.deepcopy(service)  # a typo deep inside an embedded PodSpec, reached through $ref
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolcy"
    ] = "Always"
    assert any("imagePullPolcy" in e for e in _errors(_crd_schema("RayService"), broken))

    job = copy.deepcopy(_of_kind("RayJob")[0][1])
    del job["spec"]["entrypoint"]
    assert any("'entrypoint' is a required property" in e for e in _errors(_crd_schema("RayJob"), job))

    deployment = copy.deepcopy(_of_kind("Deployment")[0][1])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_vendored_crd_schemas_are_documented_and_resolve() -> None:
    readme = (CRDS / "README.md").read_text()
    for path in RAY_CRD_SCHEMAS.values():
        assert path.name in readme
        text = path.read_text()
        assert re.search(r"commit [0-9a-f]{40}", text), f"{path.name}: source commit"
        schema = yaml.safe_load(text)

        def walk(node: Any, where: str, name: str = path.name) -> None:
            if isinstance(node, dict):
                if node.get("x-seemly-trimmed"):
                    assert "properties" not in node, f"{name} {where}: trimmed subtrees accept anything"
                ref = node.get("$ref")
                if ref is not None:
                    assert ref.startswith(K8S_DEFINITIONS_URI + "#/$defs/"), f"{name} {where}: {ref}"
                    assert ref.rpartition("/")[2] in _k8s_definitions()["$defs"], f"{name} {where}: {ref}"
                for key, value in node.items():
                    walk(value, f"{where}.{key}")
            elif isinstance(node, list):
                for index, value in enumerate(node):
                    walk(value, f"{where}[{index}]")

        walk(schema, "")
        jsonschema.Draft202012Validator.check_schema(schema)


# --- Kubernetes: policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("doc", _params(_of_kind(*_POD_KINDS)))
def test_pods_are_hardened_and_sized(doc: dict[str, Any]) -> None:
    for where, pod in _pod_templates(doc):
        pod_security = pod.get("securityContext", {})
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in _containers(pod):
            name = f"{where}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, name
            assert security.get("runAsUser", pod_security.get("runAsUser", 1000)) != 0, name
            assert security.get("allowPrivilegeEscalation") is False, name
            assert not security.get("privileged"), name
            assert security.get("readOnlyRootFilesystem") is True, name
            assert security.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not security.get("capabilities", {}).get("add"), name
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}: {bound}"
            assert _pinned(container["image"]), f"{name}: {container['image']}"
    if doc["kind"] in ("RayService", "RayJob"):
        autoscaler = doc["spec"][RAY_CLUSTER_FIELD[doc["kind"]]].get("autoscalerOptions", {})
        security = autoscaler.get("securityContext", {})
        assert security.get("runAsNonRoot") is True
        assert security.get("allowPrivilegeEscalation") is False
        assert security.get("capabilities", {}).get("drop") == ["ALL"]


def test_images_are_ours_and_versioned_with_the_package() -> None:
    version = _project_version()
    images = _images_everywhere()
    assert images
    for where, image in images:
        repository, _, tag = image.rpartition(":")
        assert repository.endswith("/seemly"), f"{where}: {image}"
        assert tag in (version, f"{version}-cuda"), f"{where}: {image} (package version {version})"
    gpu_images = [
        c["image"]
        for _, doc in RAY
        for where, pod in _pod_templates(doc)
        for c in _containers(pod)
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    ]
    assert gpu_images
    assert all(image.endswith("-cuda") for image in gpu_images), gpu_images


def test_credentials_only_through_secret_refs() -> None:
    for ident, doc in _manifests():
        if doc["kind"] == "ConfigMap":
            leaked = [k for k in doc.get("data", {}) if SECRET_NAME.search(k)]
            assert not leaked, f"{ident}: secret-looking keys in a ConfigMap: {leaked}"
        if doc["kind"] not in _POD_KINDS:
            continue
        for where, pod in _pod_templates(doc):
            for container in _containers(pod):
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]) or env["name"] == "SEEMLY_DATABASE_URL":
                        assert "value" not in env, f"{ident} {where}: {env['name']} has a literal value"
                        assert "secretKeyRef" in env.get("valueFrom", {}), f"{ident} {where}: {env['name']}"
                        assert env["valueFrom"]["secretKeyRef"]["name"] == "seemly-secrets"
    secret = _of_kind("Secret")[0]
    assert secret[0].startswith("infra/k8s/templates/"), (
        "the Secret is a template, outside the applied folder"
    )
    referenced = {
        env["valueFrom"]["secretKeyRef"]["key"]
        for _, doc in _of_kind(*_POD_KINDS)
        for _, pod in _pod_templates(doc)
        for container in _containers(pod)
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert referenced <= set(secret[1]["stringData"]), "every referenced key is in the template"


def test_backend_deployment_service_pdb_and_network_policy_agree() -> None:
    (_, deployment), (_, service), (_, pdb) = (
        _of_kind("Deployment")[0],
        _of_kind("Service")[0],
        _of_kind("PodDisruptionBudget")[0],
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("minAvailable", 0) < deployment["spec"]["replicas"], "a PDB that allows a drain"

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "backend"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["seemly-healthcheck"], probe
    port = container["ports"][0]["containerPort"]
    assert service["spec"]["ports"][0]["targetPort"] in (port, container["ports"][0]["name"])

    (_, policy) = _of_kind("NetworkPolicy")[0]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 5432, 8000, 8080, 443} <= egress_ports  # DNS, Postgres, Ray Serve, Label Studio, S3
    for rule in policy["spec"]["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:
                excepted = peer["ipBlock"].get("except", [])
                assert "169.254.0.0/16" in excepted, "the cloud metadata endpoint stays unreachable"
                assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(excepted)


def test_ray_clusters_scale_gpus_from_zero_and_match_the_image() -> None:
    ray_version = _dockerfile_args()["RAY_VERSION"]
    for ident, doc in RAY:
        cluster = doc["spec"][RAY_CLUSTER_FIELD[doc["kind"]]]
        assert cluster["rayVersion"] == ray_version, f"{ident}: rayVersion != Dockerfile RAY_VERSION"
        assert cluster["enableInTreeAutoscaling"] is True, ident
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        assert {"cpu", "gpu"} <= set(groups), ident
        assert groups["gpu"]["minReplicas"] == 0, ident
        assert groups["gpu"]["maxReplicas"] >= 1, ident
        gpu_container = groups["gpu"]["template"]["spec"]["containers"][0]
        for bound in ("requests", "limits"):
            assert gpu_container["resources"][bound]["nvidia.com/gpu"] >= 1, ident
        assert "nvidia.com/gpu" not in json.dumps(groups["cpu"]), ident


def test_ray_jobs_run_the_seemly_commands() -> None:
    entrypoints = {
        doc["metadata"]["generateName"]: doc["spec"]["entrypoint"] for _, doc in _of_kind("RayJob")
    }
    assert re.fullmatch(
        r"seemly presegment s3://\S+ --project \S+( --\S+ \S+)*", entrypoints["seemly-presegment-"]
    )
    assert re.fullmatch(r"seemly train run --project \S+( --\S+ \S+)*", entrypoints["seemly-train-"])
    for ident, doc in RAY:  # drivers and replicas must join their cluster, not start a local Ray
        for where, pod in _pod_templates(doc):
            if where == "submitter":
                continue
            env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
            assert env.get("SEEMLY_RAY_ADDRESS") == "auto", f"{ident} {where}"
    for _, doc in _of_kind("RayJob"):
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["ttlSecondsAfterFinished"] > 0
    (_, migrate) = _of_kind("Job")[0]
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]


# --- Ray Serve config ------------------------------------------------------------------------------


def _unknown_keys(model: Any, data: Any, where: str) -> list[str]:
    """Keys that the pydantic model does not define (Serve's schema ignores them silently)."""
    if not isinstance(data, dict) or not hasattr(model, "model_fields"):
        return []
    fields = model.model_fields
    aliases = {f.alias for f in fields.values() if f.alias}
    unknown = [f"{where}.{k}" for k in data if k not in fields and k not in aliases]
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            continue
        inner = field.annotation
        for candidate in getattr(inner, "__args__", (inner,)):
            for item in value if isinstance(value, list) else [value]:
                unknown += _unknown_keys(candidate, item, f"{where}.{key}")
    return unknown


def test_serve_config_is_valid_for_ray_serve() -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    parsed = ServeDeploySchema.model_validate(config)
    assert _unknown_keys(ServeDeploySchema, config, "") == []
    (app,) = parsed.applications
    assert (app.name, app.route_prefix, app.import_path) == (
        "segmenter",
        "/segment",
        "workers.serve:build_app",
    )
    (deployment,) = app.deployments
    assert deployment.name == "Segmenter"
    autoscaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    bounds = AutoscalingConfig(**autoscaling)
    assert 1 <= bounds.min_replicas <= bounds.max_replicas
    actor = deployment.ray_actor_options
    assert actor.num_cpus > 0 and actor.num_gpus >= 0


def test_serve_config_equals_the_rayservice_serve_config() -> None:
    (_, service) = _of_kind("RayService")[0]
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "infra/serve/segmenter.yaml and the RayService's serveConfigV2 drifted apart"
    )


# --- docker compose --------------------------------------------------------------------------------


@cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value
    return pairs


def test_compose_services_and_images() -> None:
    services = _compose()["services"]
    expected = {
        "postgres",
        "minio",
        "minio-init",
        "label-studio",
        "migrate",
        "ray-head",
        "ray-worker",
        "backend",
    }
    assert expected <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert _pinned(image) and "$" not in image, f"{name}: image {image!r} is not pinned"
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:1.23.")
    assert services["postgres"]["image"].split(":")[1].startswith("15")
    ours = {name for name, s in services.items() if s["image"].split(":")[0] == "seemly"}
    assert ours == {"migrate", "ray-head", "ray-worker", "backend"}
    for name in ours:
        assert services[name]["image"] == f"seemly:{_project_version()}", name
        assert services[name]["build"]["dockerfile"] == "infra/docker/Dockerfile", name
        assert services[name]["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in services[name]["security_opt"], name


def test_compose_start_order_and_health() -> None:
    services = _compose()["services"]
    backend = services["backend"]
    assert backend["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert backend["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert backend["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert backend["command"][0] == "backend"
    assert "--head" in services["ray-head"]["command"] and "--block" in services["ray-head"]["command"]
    assert any(a.startswith("--address=ray-head:") for a in services["ray-worker"]["command"])
    for name, service in services.items():
        if service.get("restart") == "no":
            continue  # one-shot jobs
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    volumes = set(_compose()["volumes"])
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith("./") or source in volumes, f"{name}: undeclared volume {source}"


def test_compose_ports_are_local_only() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"


def test_compose_variables_are_all_in_env_example_with_secrets_empty() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    declared = _env_example()
    assert used <= set(declared), f"not in .env.example: {sorted(used - set(declared))}"
    assert set(declared) <= used, f"declared but unused: {sorted(set(declared) - used)}"
    for key, value in declared.items():
        if SECRET_NAME.search(key) and not key.endswith(("_ACCESS_KEY_ID", "_USER")):
            assert value == "", f".env.example: {key} must be empty (init-env.sh fills it)"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {k for k, v in declared.items() if v == "" and SECRET_NAME.search(k)} <= required
    assert (INFRA / "compose" / ".gitignore").read_text().splitlines()[-1] == ".env"


def test_init_env_fills_every_secret(tmp_path: Path) -> None:
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env.example")
    shutil.copy(INFRA / "compose" / "init-env.sh", tmp_path / "init-env.sh")
    subprocess.run(["sh", str(tmp_path / "init-env.sh")], check=True, capture_output=True)
    written = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines() if "=" in line)
    for key, value in _env_example().items():
        if value == "" and SECRET_NAME.search(key):
            assert re.fullmatch(r"[0-9a-f]{40,}", written[key]), key
    assert len(written["LABEL_STUDIO_USER_TOKEN"]) == 40
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0, ".env is private to its owner"
    again = subprocess.run(["sh", str(tmp_path / "init-env.sh")], capture_output=True)
    assert again.returncode != 0, "never overwrites an existing .env"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_passes_compose_config(tmp_path: Path) -> None:
    """`compose config` where a Compose CLI is installed (it needs no daemon); skipped elsewhere."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose / docker-compose CLI on this machine")
    shutil.copytree(INFRA / "compose", tmp_path / "compose")
    subprocess.run(["sh", str(tmp_path / "compose" / "init-env.sh")], check=True, capture_output=True)
    compose_file = tmp_path / "compose" / "docker-compose.yml"
    if cli == ["docker-compose"]:  # Compose v1 predates the top-level `name`
        compose_file.write_text(re.sub(r"(?m)^name: .*$", "", compose_file.read_text()))
    result = subprocess.run(
        [*cli, "--project-directory", str(tmp_path / "compose"), "-f", str(compose_file), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_is_multistage_nonroot_and_has_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line.split(None, 1) for line in _dockerfile_lines(text)]
    stages = [rest for word, rest in instructions if word.upper() == "FROM"]
    assert len(stages) >= 2, "multi-stage"
    users = [rest.strip() for word, rest in instructions if word.upper() == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"runs as {users[-1]}"
    assert users[-1].split(":")[0] == "1000", "uid 1000, as the manifests' runAsUser"
    assert any(word.upper() == "HEALTHCHECK" and "seemly-healthcheck" in rest for word, rest in instructions)
    (entrypoint,) = [rest for word, rest in instructions if word.upper() == "ENTRYPOINT"]
    assert json.loads(entrypoint)[-1] == "seemly"
    args = _dockerfile_args()
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    for word, rest in instructions:
        if word.upper() in ("COPY", "ADD"):
            assert not re.match(r"^(--\S+\s+)*\.\s", rest), "COPY . copies the whole context"


def _dockerfile_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    )
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_dockerfile_bakes_in_no_secret() -> None:
    for line in _dockerfile_lines(DOCKERFILE.read_text()):
        word, _, rest = line.partition(" ")
        if word.upper() not in ("ENV", "ARG", "LABEL"):
            continue
        for key, value in re.findall(r"(\w[\w.-]*)\s*=\s*(\"[^\"]*\"|\S+)", rest):
            if SECRET_NAME.search(key):
                pytest.fail(f"{word} {key}={value}: secret-looking name with a value in the Dockerfile")
        if word.upper() in ("ENV", "ARG") and "=" not in rest:
            assert not SECRET_NAME.search(rest), f"{line}: secret-looking name"


def test_dockerfile_versions_follow_the_makefile() -> None:
    args = _dockerfile_args()
    makefile_torch = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text())
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1)


def test_dockerignore_is_an_allowlist() -> None:
    lines = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert lines[0] == "*", "exclude everything, then allow"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set(re.findall(r"(?m)^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", DOCKERFILE.read_text()))
    sources = {src.rstrip("/") for group in copied for src in group.split() if not src.startswith("--from")}
    sources.discard("/opt/venv")
    assert sources <= allowed, f"copied but not in .dockerignore's allowlist: {sorted(sources - allowed)}"
    assert not any(a.startswith((".venv", ".git", "tests", ".env")) for a in allowed)
    assert {"**/.env", "**/__pycache__"} <= set(lines)


# --- no committed secrets --------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credentials in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:([^\s/@'\"]+)@"),
    "MinIO default credentials": re.compile(r"\bminioadmin\b"),
    "GitHub/Slack/Google token": re.compile(
        r"\b(gh[pousr]_[A-Za-z0-9]{30,}|xox[abp]-[A-Za-z0-9-]{10,}|AIza[\w-]{35})"
    ),
    "JWT": re.compile(r"\beyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]{10,}"),
    "long hex or base64 literal": re.compile(
        r"(?<![\w/$.-])[A-Fa-f0-9]{32,}(?![\w/])|[A-Za-z0-9+/]{40,}={0,2}"
    ),
}


def _infra_text_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name != ".env"]
    return [*files, ROOT / ".dockerignore"]


def test_no_secret_values_are_committed_in_infra() -> None:
    assert (
        not (INFRA / "compose" / ".env").exists() or ".env" in (INFRA / "compose" / ".gitignore").read_text()
    )
    problems = []
    for path in _infra_text_files():
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                found = match.group(0)
                if what == "credentials in a URL" and PLACEHOLDER.match(match.group(1)):
                    continue
                if what == "long hex or base64 literal" and _is_known_hash(path, found):
                    continue
                problems.append(f"{path.relative_to(ROOT)}: {what}: {found[:12]}...")
        if path.suffix in (".yaml", ".yml") or path.name in (".env.example", "Dockerfile"):
            problems += _secret_assignments(path, text)  # configuration, not code
    assert problems == []


def _is_known_hash(path: Path, found: str) -> bool:
    """Git commit ids of the vendored CRD sources are not secrets."""
    return path.parent == CRDS and re.fullmatch(r"[0-9a-f]{40}", found) is not None


def _secret_assignments(path: Path, text: str) -> list[str]:
    """KEY: value / KEY=value lines whose key looks secret and whose value is a literal."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        match = re.match(r"^-?\s*([\w.-]+)\s*[:=]\s*(.*)$", stripped)
        if not match or not SECRET_NAME.search(match.group(1)):
            continue
        key, value = match.group(1), match.group(2).strip().strip("\"'")
        value = value.split(" #")[0].strip()
        if (
            value in ("", "|", ">", "true", "false")
            or PLACEHOLDER.match(value)
            or "CHANGE-ME" in value
            or value.startswith(("${", "$$", "$("))
            or key in ("key", "secretName")  # secretKeyRef.key names a Secret key, not a value
            or key.endswith(("_ACCESS_KEY_ID", "_USER", "-key-id", "-user"))  # identifiers, not secrets
        ):
            continue
        out.append(f"{path.relative_to(ROOT)}:{number}: {key} has a literal value")
    return out


# --- the health-check script -----------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(b"labelstudio:s3cret-for-the-test").decode()

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/health")
        elif self.path == "/open" or self.headers.get("Authorization") == self.expected:
            self.send_response(200)
        else:
            self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck(url: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEEMLY_")}
    args = [sys.executable, str(HEALTHCHECK)] + ([url] if url else [])
    return subprocess.run(args, env={**clean, **env}, capture_output=True, text=True, timeout=30)


def test_healthcheck_script(health_server: str) -> None:
    auth = {
        "SEEMLY_BACKEND_BASIC_AUTH_USER": "labelstudio",
        "SEEMLY_BACKEND_BASIC_AUTH_PASSWORD": "s3cret-for-the-test",
    }
    assert _healthcheck(f"{health_server}/open").returncode == 0
    assert _healthcheck(f"{health_server}/health").returncode == 1  # 401 without credentials
    ok = _healthcheck(f"{health_server}/health", **auth)
    assert ok.returncode == 0, ok.stderr
    assert _healthcheck(None, SEEMLY_HEALTHCHECK_URL=f"{health_server}/health", **auth).returncode == 0
    redirected = _healthcheck(f"{health_server}/redirect", **auth)
    assert redirected.returncode == 1, "a redirect is a failure, never followed with the credentials"
    wrong = _healthcheck(f"{health_server}/health", **{**auth, "SEEMLY_BACKEND_BASIC_AUTH_PASSWORD": "nope"})
    assert wrong.returncode == 1
    assert "s3cret" not in wrong.stdout + wrong.stderr
    assert _healthcheck("http://127.0.0.1:9/health").returncode == 1  # nothing listens

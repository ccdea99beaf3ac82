"""deploy/docker-compose.yml, the Dockerfiles and deploy/k8s validate offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, require_tool

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"
CONVERSION_PACKAGES = {"torch", "transformers", "optimum", "optimum-onnx", "onnx", "gguf", "accelerate"}


def compose_command() -> list[str]:
    """`docker compose` where the plugin exists, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [require_tool("docker-compose")]


def compose_config(*args: str, secret: str | None = "test-secret") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    if secret is not None:
        env["SECRET_KEY"] = secret
    return subprocess.run(
        [*compose_command(), "-f", str(DEPLOY / "docker-compose.yml"), "-p", "fulcrum", *args, "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=DEPLOY,
        timeout=120,
    )


# --- compose -----------------------------------------------------------------------------------------------------


def test_compose_file_validates_with_and_without_the_gpu_profile() -> None:
    for profile in ([], ["--profile", "gpu"]):
        result = compose_config(*profile)
        assert result.returncode == 0, result.stderr
        services = yaml.safe_load(result.stdout)["services"]
        expected = {"postgres", "redis", "migrate", "web", "worker-cpu", "beat", "prometheus", "grafana"}
        assert expected <= set(services)
        # Compose v2 leaves an inactive profile's services out of `config`; v1 lists them with their profile.
        if profile or "worker-gpu" in services:
            assert services["worker-gpu"]["profiles"] == ["gpu"]


def test_compose_refuses_to_start_without_a_secret_key() -> None:
    result = compose_config(secret=None)
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_compose_services_are_wired_for_production() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    gpu = services["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    assert gpu["environment"]["FULCRUM_PROVIDER"] == "cuda"
    assert services["worker-cpu"]["environment"]["FULCRUM_PROVIDER"] == "cpu"
    assert services["web"]["command"][0] == "gunicorn"
    assert services["beat"]["command"] == ["python", "manage.py", "beat"]
    for name in ("web", "worker-cpu", "worker-gpu", "beat"):
        service = services[name]
        env = service["environment"]
        assert env["CELERY_BROKER_URL"].startswith("redis://redis:")
        assert env["DATABASE_URL"].startswith("postgresql://")
        assert env["FULCRUM_QUEUE_ROUTING"] == "device"
        assert "healthcheck" in service, name
        assert any(t.startswith(env["PROMETHEUS_MULTIPROC_DIR"]) for t in service["tmpfs"]), name
    dockerfiles = {name: services[name]["build"]["dockerfile"] for name in ("migrate", "worker-cpu", "worker-gpu")}
    for dockerfile in dockerfiles.values():
        assert (ROOT / dockerfile).is_file()


# --- images ------------------------------------------------------------------------------------------------------


def test_worker_images_carry_no_conversion_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}

    extras = project["optional-dependencies"]
    assert not names(project["dependencies"]) & CONVERSION_PACKAGES
    assert not names(extras["gpu"]) & CONVERSION_PACKAGES and not names(extras["web"]) & CONVERSION_PACKAGES
    for name in ("worker", "worker-gpu", "web"):
        dockerfile = (DEPLOY / "docker" / f"{name}.Dockerfile").read_text()
        installs = [line for line in dockerfile.splitlines() if "pip install" in line]
        assert installs and all("-c constraints.txt" in line for line in installs), name
        assert "convert" not in " ".join(installs), name
        assert (DEPLOY / "docker" / f"{name}.Dockerfile.dockerignore").is_file()
    assert "pip show --quiet torch transformers optimum" in (DEPLOY / "docker" / "worker.Dockerfile").read_text()


# --- kubernetes --------------------------------------------------------------------------------------------------


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs.append((path, doc))
    return docs


def test_every_kubernetes_manifest_validates_against_the_api_schema() -> None:
    docs = k8s_documents()
    assert len(docs) >= 15
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk
    kubectl = shutil.which("kubectl")
    if kubectl:  # not needed, but where kubectl exists its offline build must work too
        built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        built_docs = [d for d in yaml.safe_load_all(built.stdout) if d and d["kind"] != "Namespace"]
        assert all(d["metadata"].get("namespace") == "fulcrum" for d in built_docs)


def deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == "Deployment"}


def test_workers_scale_one_per_gpu_with_a_queue_per_device_class() -> None:
    found = deployments()
    gpu = found["fulcrum-worker-gpu"]["spec"]["template"]["spec"]
    cpu = found["fulcrum-worker-cpu"]["spec"]["template"]["spec"]
    (gpu_container,) = gpu["containers"]
    (cpu_container,) = cpu["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    gpu_env = {e["name"]: e["value"] for e in gpu_container["env"]}
    cpu_env = {e["name"]: e["value"] for e in cpu_container["env"]}
    assert gpu_env["FULCRUM_WORKER_CONCURRENCY"] == "1"  # one pool process per GPU
    assert gpu_env["FULCRUM_PROVIDER"] == "cuda" and cpu_env["FULCRUM_PROVIDER"] == "cpu"
    assert gpu_env["FULCRUM_WORKER_QUEUES"] == "fulcrum.gpu,fulcrum"
    assert cpu_env["FULCRUM_WORKER_QUEUES"] == "fulcrum.cpu,fulcrum"
    terms = gpu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present"
    assert found["fulcrum-worker-gpu"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert found["fulcrum-beat"]["spec"]["replicas"] == 1


def test_every_fulcrum_deployment_has_probes_and_takes_its_configuration_from_the_environment() -> None:
    configmaps = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == "ConfigMap"}
    config = configmaps["fulcrum-config"]["data"]
    assert config["FULCRUM_QUEUE_ROUTING"] == "device"
    assert all(isinstance(v, str) for v in config.values())
    for name, deployment in deployments().items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, name
            if name.startswith("fulcrum-") and name not in {"fulcrum-redis"}:
                sources = [s.get("configMapRef", s.get("secretRef", {})).get("name") for s in container["envFrom"]]
                assert sources == ["fulcrum-config", "fulcrum-secrets"], name
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert config["PROMETHEUS_MULTIPROC_DIR"] in mounts, name


def test_kubernetes_prometheus_finds_every_component_through_its_headless_service() -> None:
    services = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == "Service"}
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                service_name, namespace = name.split(".")[:2]
                service = services[service_name]
                assert namespace == service["metadata"]["namespace"]
                assert service["spec"]["clusterIP"] == "None"
                assert [p["port"] for p in service["spec"]["ports"]] == [sd["port"]]

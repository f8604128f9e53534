"""Static checks of cluster/: launcher configs, KubeRay manifests, runtime_env, README.

Fast and offline: no Ray cluster is started and no cloud API is called. The launcher configs go
through ray-schema.json and through Ray's own prepare_config + validate_config, which is what
`ray up` runs before it touches the cloud.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = {"aws.yaml": "aws", "gcp.yaml": "gcp"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RAY_PORTS = {8265, 6379, 10001}
GPU = "nvidia.com/gpu"


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict:
    docs = _docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) in a nested dict/list structure; path ends with the key or index."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def _image_ray_version(image: str) -> str:
    """rayproject/ray:2.60.0-py311-gpu -> 2.60.0"""
    repo, _, tag = image.rpartition(":")
    assert repo.endswith("rayproject/ray"), f"unexpected image {image!r}"
    return tag.split("-")[0]


def _ray_cluster_spec(name: str) -> dict:
    """The RayCluster spec in raycluster.yaml, or the one a RayJob in rayjob.yaml creates."""
    if name == RAYCLUSTER.name:
        return _one(RAYCLUSTER)["spec"]
    return _one(RAYJOB)["spec"]["rayClusterSpec"]


SPECS = [RAYCLUSTER.name, RAYJOB.name]


def _pod_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _req_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


# ---------------------------------------------------------------- every file


def test_expected_files_exist():
    for rel in ("aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} missing"
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path: Path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top level must be a mapping"


# ---------------------------------------------------------------- VM launcher (ray up)


def _launcher(name: str) -> dict:
    return _one(CLUSTER / name)


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_matches_ray_schema(name: str):
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_launcher(name), schema)


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_passes_ray_validate_config(name: str):
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    # prepare_config merges the provider's defaults.yaml (a local file) exactly as `ray up` does;
    # validate_config is the schema + consistency check `ray up` runs next.
    prepared = util.prepare_config(copy.deepcopy(_launcher(name)))
    util.validate_config(prepared)


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_shape(name: str):
    cfg = _launcher(name)
    assert cfg["provider"]["type"] == LAUNCHER_FILES[name]

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node type should be a CPU node"

    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu_workers = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "need an autoscaling GPU worker node type"
    for key, node in gpu_workers.items():
        assert node.get("min_workers", 0) == 0, f"{key}: GPU workers should scale from zero"
        assert 1 <= node["max_workers"] <= cfg["max_workers"], key

    if LAUNCHER_FILES[name] == "gcp":
        for node in gpu_workers.values():
            conf = node["node_config"]
            assert conf.get("guestAccelerators") or conf["machineType"].startswith(("g2-", "a2-", "a3-"))
            assert conf["scheduling"]["onHostMaintenance"] == "TERMINATE"
    else:
        for node in gpu_workers.values():
            assert node["node_config"]["InstanceType"].startswith(("g", "p"))


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_image_matches_installed_ray(name: str):
    docker = _launcher(name)["docker"]
    images = [docker["image"]] + [docker[k] for k in ("head_image", "worker_image") if k in docker]
    for image in images:
        assert _image_ray_version(image) == ray.__version__, image
    assert "-gpu" in docker["image"] or re.search(r"-cu\d+", docker["image"]), "GPU workers need a GPU image"
    for opt in docker.get("run_options", []):
        assert not re.match(r"^\s*(-p|--publish)\b", opt), f"docker must not publish ports: {opt}"


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_installs_project_and_starts_ray(name: str):
    cfg = _launcher(name)
    mounts = cfg["file_mounts"]
    project_targets = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert project_targets, "the checkout must be uploaded with file_mounts ('.': run ray up from the repo root)"
    setup = " ".join(cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []))
    assert any("pip install" in setup and t in setup for t in project_targets), "setup must pip install raypipe"

    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_launcher_token_auth(name: str):
    cfg = _launcher(name)
    # Doc: https://docs.ray.io/en/latest/ray-security/token-auth.html (remote virtual machines)
    assert any(
        remote.endswith(".ray/auth_token") and local == "~/.ray/auth_token"
        for remote, local in cfg["file_mounts"].items()
    ), "the local token must be copied to the nodes"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(cfg[key]), f"{key} must start Ray with RAY_AUTH_MODE=token"
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["setup_commands"]), "shells on the nodes need RAY_AUTH_MODE=token"


# ---------------------------------------------------------------- KubeRay


def test_kuberay_kinds():
    assert [(d["apiVersion"], d["kind"]) for d in _docs(RAYCLUSTER)] == [("ray.io/v1", "RayCluster")]
    assert [(d["apiVersion"], d["kind"]) for d in _docs(RAYJOB)] == [("ray.io/v1", "RayJob")]


@pytest.mark.parametrize("name", SPECS)
def test_kuberay_versions_match_installed_ray(name: str):
    spec = _ray_cluster_spec(name)
    assert spec["rayVersion"] == ray.__version__, f"{name}: rayVersion"
    for container in _pod_containers(spec):
        assert _image_ray_version(container["image"]) == ray.__version__, f"{name}: {container['image']}"


@pytest.mark.parametrize("name", SPECS)
def test_kuberay_head_and_gpu_workers(name: str):
    spec = _ray_cluster_spec(name)
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{name}: headGroupSpec.rayStartParams"
    assert head["template"]["spec"]["containers"], name
    for container in head["template"]["spec"]["containers"]:
        assert GPU not in container["resources"].get("limits", {}), f"{name}: head should be a CPU pod"

    groups = spec["workerGroupSpecs"]
    gpu_groups = [
        g for g in groups if any(GPU in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, f"{name}: need a GPU worker group"
    for group in gpu_groups:
        assert isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] == 0, f"{name}/{group['groupName']}: scale from zero"
        assert group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert int(res["limits"][GPU]) >= 1
            assert res["requests"][GPU] == res["limits"][GPU], "extended resources: requests must equal limits"

    for container in _pod_containers(spec):
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in container["resources"].get(kind, {}), (
                    f"{name}/{container['name']}: {kind}.{resource}"
                )


@pytest.mark.parametrize("name", SPECS)
def test_kuberay_autoscaling_and_token_auth(name: str):
    spec = _ray_cluster_spec(name)
    assert spec["enableInTreeAutoscaling"] is True, name
    auth = spec.get("authOptions")
    if auth is not None:
        # KubeRay v1.5.1+: the operator sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every Ray container.
        # https://docs.ray.io/en/latest/cluster/kubernetes/user-guides/kuberay-auth.html
        assert auth.get("mode", "token") == "token", name
        assert auth.get("secretName"), f"{name}: name the token Secret so clients can read it"
    else:
        # Older operators: env vars on every container, the token from a Secret.
        for container in _pod_containers(spec):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}/{container['name']}"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], f"{name}/{container['name']}"


def test_rayjob_fields():
    spec = _one(RAYJOB)["spec"]
    entrypoint = " ".join(spec["entrypoint"].split())
    assert entrypoint.startswith("python jobs/rlap.py "), entrypoint
    assert re.search(r"--out (s3|gs)://\S+", entrypoint), "outputs must go to an object-store run URI"
    assert re.search(r"--config jobs/configs/\S+\.ya?ml", entrypoint)
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")


def test_rayjob_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(_one(RAYJOB)["spec"]["runtimeEnvYAML"])
    # The submitter pod has no checkout: the code must come from a remote zip.
    assert re.match(r"^(s3|gs|https)://\S+\.zip$", env["working_dir"]), env["working_dir"]
    for name in env.get("env_vars", {}):
        assert not SECRET_ENV.search(name), f"no secrets in runtimeEnvYAML env_vars: {name}"
    RuntimeEnv(**env)  # Ray's own field validation


# ---------------------------------------------------------------- runtime_env.yaml

RUNTIME_ENV_FIELDS = {"working_dir", "py_modules", "excludes", "pip", "uv", "env_vars", "config"}


def test_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    env = _one(RUNTIME_ENV)
    assert set(env) <= RUNTIME_ENV_FIELDS, f"unexpected fields {set(env) - RUNTIME_ENV_FIELDS}"
    assert env["working_dir"] == "."
    excludes = " ".join(env["excludes"])
    for must in (".venv", "runs", ".git", "bench/results", "*.pt", "*.parquet"):
        assert must in excludes, f"excludes should cover {must}"
    for name in env.get("env_vars", {}):
        assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL", name, re.I), f"no secrets in env_vars: {name}"
    RuntimeEnv(**env)  # Ray's own field validation (no cluster needed)


def test_pip_lists_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {_req_name(d) for d in deps} - {"ray"}
    lists = {
        "runtime_env.yaml": _one(RUNTIME_ENV)["pip"],
        "rayjob.yaml": yaml.safe_load(_one(RAYJOB)["spec"]["runtimeEnvYAML"])["pip"],
    }
    for where, pip in lists.items():
        packages = pip["packages"] if isinstance(pip, dict) else pip
        names = {_req_name(p) for p in packages}
        assert "ray" not in names, f"{where}: never reinstall ray at runtime; the cluster image provides it"
        assert names == expected, f"{where}: pip {sorted(names)} != pyproject deps minus ray {sorted(expected)}"


# ---------------------------------------------------------------- security

SECRET_KEY = re.compile(
    r"(aws_access_key_id|aws_secret_access_key|secret_access_key|session_token|private_key|password|passwd"
    r"|api_key|client_secret|credentials?$|gcp_credentials|auth_token|bearer)",
    re.I,
)
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\"type\"\s*:\s*\"service_account\""),  # GCP key file
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_credentials(path: Path):
    for doc in _docs(path):
        assert doc.get("kind") != "Secret", f"{path}: create Secrets out of band (kubectl create secret ...)"
        for where, value in _walk(doc):
            key = where[-1] if where else None
            # Keys that are paths (file_mounts targets such as ~/.ray/auth_token) name files, not secrets.
            if isinstance(key, str) and "/" not in key:
                assert not SECRET_KEY.search(key), f"{path}: credential-looking key {'.'.join(map(str, where))}"
            if isinstance(value, dict) and isinstance(value.get("name"), str) and "value" in value:
                assert not SECRET_ENV.search(value["name"]), f"{path}: literal value for {value['name']}"
    text = path.read_text()
    for pattern in SECRET_TEXT:
        assert not pattern.search(text), f"{path}: looks like a credential ({pattern.pattern})"


def test_no_credentials_in_readme():
    text = (CLUSTER / "README.md").read_text()
    for pattern in SECRET_TEXT:
        assert not pattern.search(text), pattern.pattern


def _ports_of(rule: dict) -> set[int]:
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if lo in (-1, None) or rule.get("IpProtocol") == "-1":
        return set(RAY_PORTS)
    return {p for p in RAY_PORTS if lo <= p <= hi}


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_public_exposure(path: Path):
    for doc in _docs(path):
        kind = doc.get("kind")
        assert kind not in ("Ingress", "Gateway", "HTTPRoute", "Route"), f"{path}: no {kind}"
        if kind == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", f"{path}: Service type"
        for where, value in _walk(doc):
            key = where[-1] if where else None
            assert value not in ("0.0.0.0/0", "::/0"), f"{path}: world-open range at {'.'.join(map(str, where))}"
            if key in ("serviceType", "type") and isinstance(value, str):
                assert value not in ("LoadBalancer", "NodePort"), f"{path}: {'.'.join(map(str, where))}={value}"
            if key == "enableIngress":
                assert value is not True, f"{path}: enableIngress"
            if key in ("hostNetwork", "hostPort"):
                assert not value, f"{path}: {key} exposes Ray ports on the node"
        # Launcher: no security-group rule opening Ray's ports to everyone.
        rules = doc.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
        for rule in rules:
            ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
            ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
            if {"0.0.0.0/0", "::/0"} & set(ranges):
                assert not _ports_of(rule), f"{path}: ports {_ports_of(rule)} open to the internet"


# ---------------------------------------------------------------- cross references


def _cluster_text() -> str:
    return "\n".join(p.read_text() for p in sorted(CLUSTER.rglob("*")) if p.suffix in (".yaml", ".yml", ".md"))


def test_referenced_job_configs_exist():
    configs_dir = ROOT / "jobs" / "configs"
    if not configs_dir.is_dir() or not any(configs_dir.glob("*.y*ml")):
        pytest.skip("jobs/configs/*.yaml not written yet")
    referenced = set(re.findall(r"jobs/configs/[A-Za-z0-9_.-]+\.ya?ml", _cluster_text()))
    assert referenced, "cluster files should show a --config example"
    missing = sorted(r for r in referenced if not (ROOT / r).is_file())
    assert not missing, f"cluster/ references missing configs: {missing}"


def test_referenced_job_entrypoints_exist():
    if not any((ROOT / "jobs").glob("*.py")):
        pytest.skip("jobs/*.py not written yet")
    referenced = set(re.findall(r"jobs/[A-Za-z0-9_]+\.py", _cluster_text()))
    missing = sorted(r for r in referenced if not (ROOT / r).is_file())
    assert not missing, f"cluster/ references missing entrypoints: {missing}"


def test_readme_documents_the_workflow():
    text = (CLUSTER / "README.md").read_text()
    for needle in (
        "ray up",
        "ray dashboard",
        "ray job submit",
        "ray job logs",
        "ray down",
        "kubectl apply",
        "kubectl port-forward",
        "kubectl delete",
        "RAY_AUTH_MODE=token",
        "auth_token",
    ):
        assert needle in text, f"README should show `{needle}`"

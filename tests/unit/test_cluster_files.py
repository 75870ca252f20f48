"""The cluster definitions in cluster/ parse, carry what a GPU sweep needs, name entrypoints and
flags that exist, and hold no credentials."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
TUNE_FLAGS = {
    "--space",
    "--data",
    "--storage",
    "--name",
    "--samples",
    "--epochs",
    "--workers-per-trial",
    "--gpus-per-worker",
    "--max-concurrent",
    "--resume",
}
S3_SECRETS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_containers(cluster_spec):
    """(group name, container) for every container of the head and worker groups."""
    yield from (
        ("head", c) for c in cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    )
    for group in cluster_spec["workerGroupSpecs"]:
        yield from ((group["groupName"], c) for c in group["template"]["spec"]["containers"])


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def test_launcher_has_cpu_head_and_autoscaled_gpu_workers():
    cfg = load("launcher-gpu.yaml")
    assert cfg["provider"]["type"] == "aws"
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 1
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type offers a GPU"
    for name, node_type in gpu_types.items():
        assert name != cfg["head_node_type"]
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"]
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p"))

    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e /home/ray/raypose" in setup
    assert "[cpu]" not in setup, "GPU nodes must not install the CPU-only torch extra"
    assert cfg["file_mounts"]["/home/ray/raypose"] == "."
    assert {".venv", ".git"} <= {p.strip("*/") for p in cfg["rsync_exclude"]}

    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    # The token reaches every node as a file, from outside the repository.
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"].startswith("~/")


@pytest.mark.parametrize(
    "name,path",
    [("kuberay-raycluster.yaml", ("spec",)), ("kuberay-rayjob.yaml", ("spec", "rayClusterSpec"))],
)
def test_kuberay_cluster_spec(name, path):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc
    for key in path:
        spec = spec[key]
    assert spec["rayVersion"] == "2.60.0"
    # token auth through KubeRay's own field names (RayCluster CRD: spec.authOptions.mode and
    # .secretName), so that the autoscaler sidecar and a RayJob's submitter get the token too
    assert spec["authOptions"] == {"mode": "token", "secretName": "raypose-ray-token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = []
    for group, container in ray_containers(spec):
        assert container["image"], f"{group}: no image"
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{group}: {kind} lacks cpu/memory"
        if resources["limits"].get("nvidia.com/gpu", 0) >= 1:
            gpu_groups.append(group)
        env = env_of(container)
        # KubeRay sets the token variables itself (authOptions); our own would shadow them
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), f"{group}: token env set by hand"
        for variable in S3_SECRETS:
            ref = env[variable]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], f"{group}: {variable} not from a Secret"
            assert "value" not in env[variable]
    assert gpu_groups and "head" not in gpu_groups
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]


def test_rayjob_runs_an_existing_entrypoint_with_flags_tune_accepts():
    job = load("kuberay-rayjob.yaml")
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    # The job's cluster is the RayCluster manifest's cluster, so that the two stay in step.
    assert spec["rayClusterSpec"] == load("kuberay-raycluster.yaml")["spec"]

    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python"
    assert (REPO / words[1]).is_file(), f"entrypoint script {words[1]} is not in the repository"
    assert words[1] == "jobs/tune.py"
    args = words[2:]
    assert (REPO / args[args.index("--space") + 1]).is_file()
    if (REPO / "raypose" / "search" / "sweep.py").is_file():
        from raypose.cli import build_parser

        parsed = build_parser(["tune"]).parse_args(["tune", *args])  # SystemExit on an unknown flag
        assert parsed.storage.startswith("s3://") and parsed.gpus_per_worker == 1
        # a retry (on a new RayCluster) continues the sweep the first attempt started
        assert parsed.resume == "auto"
    else:
        assert {a for a in args if a.startswith("--")} <= TUNE_FLAGS

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert not any(
        k.startswith("AWS_") or k.startswith("RAY_AUTH") for k in runtime_env["env_vars"]
    )
    assert "--resume auto" in spec["entrypoint"]
    assert spec["backoffLimit"] >= 1  # retries, which --resume auto turns into continuations
    # the submitter gets the token from KubeRay (the cluster's authOptions)
    submitter = env_of(spec["submitterPodTemplate"]["spec"]["containers"][0])
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(submitter)


def test_evaluation_rayjob_runs_its_driver_where_a_gpu_is():
    job = load("kuberay-rayjob-evaluate.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    # it submits to the RayCluster of kuberay-raycluster.yaml, which has authOptions
    assert spec["clusterSelector"] == {
        "ray.io/cluster": load("kuberay-raycluster.yaml")["metadata"]["name"]
    }
    assert "rayClusterSpec" not in spec
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", "jobs/evaluate.py"] and (REPO / words[1]).is_file()
    from raypose.cli import build_parser

    parsed = build_parser(["evaluate"]).parse_args(["evaluate", *words[2:]])
    assert parsed.uri.startswith("s3://") and parsed.gpu
    # the head has no GPU: the entrypoint asks for one, so Ray runs the driver on a GPU node
    assert spec["entrypointNumGpus"] >= 1
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not any(
        k.startswith("AWS_") or k.startswith("RAY_AUTH") for k in runtime_env["env_vars"]
    )


def test_launcher_and_readme_submit_evaluation_with_a_gpu_and_sweeps_with_auto_resume():
    for text in ((CLUSTER / "launcher-gpu.yaml").read_text(), (REPO / "README.md").read_text()):
        evaluate_lines = [line for line in text.splitlines() if "--entrypoint-num-gpus 1" in line]
        assert evaluate_lines, "no evaluation submitted with --entrypoint-num-gpus 1"
        assert "--resume auto" in text


def test_runtime_env():
    runtime_env = load("runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    excluded = {e.strip("/") for e in runtime_env["excludes"]}
    assert {".venv", "data", "runs", ".git"} <= excluded
    env_vars = runtime_env["env_vars"]
    assert env_vars["RAY_DEDUP_LOGS"] == "0"
    # Ray requires string values, and credentials never travel in a runtime_env.
    assert all(isinstance(v, str) for v in env_vars.values())
    assert not any(k.startswith("AWS_") or k.startswith("RAY_AUTH") for k in env_vars)


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "long hex token": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
    "AWS secret access key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "inline secret value": re.compile(
        r"(?i)(secret_access_key|auth_token|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}"
    ),
}


@pytest.mark.parametrize("path", sorted(p.name for p in CLUSTER.iterdir() if p.is_file()))
def test_no_secrets_in_cluster_files(path):
    text = (CLUSTER / path).read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = pattern.search(text)
        assert match is None, f"cluster/{path}: looks like a {what}: {match.group(0)!r}"

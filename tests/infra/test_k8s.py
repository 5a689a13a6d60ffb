"""The Kubernetes path (infra/k8s/, infra/docker/), checked without a cluster: every manifest is a KubeRay
v1.6.2 resource with no misspelled field, runs the image's Ray, asks for exactly the GPUs its entrypoint's
config trains on, and its entrypoint resolves to a valid config."""

from __future__ import annotations

import copy
import json
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from infra.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
SCHEMAS = {"RayJob": "rayjob.json", "RayCluster": "raycluster.json"}
# The recipe each entry script runs (orchestration/cli.py refuses a config of another recipe).
SCRIPT_RECIPES = {"orchestration/pretrain.py": "rectified_flow", "orchestration/distill.py": "scd",
                  "orchestration/tune.py": None}
GPU = "nvidia.com/gpu"


# --------------------------------------------------------------------------------------------------
# Reading the manifests
# --------------------------------------------------------------------------------------------------


def strict(schema):
    """The schema with ``additionalProperties: false`` wherever it lists properties and neither keeps unknown
    fields (``x-kubernetes-preserve-unknown-fields``) nor says what other keys may hold: the API server drops
    unknown fields of a custom resource without a word, so only this makes a misspelled field an error."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads((K8S / "schema" / SCHEMAS[kind]).read_text())))


def schema_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator(doc["kind"]).iter_errors(doc)]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_workers(doc: dict) -> tuple[dict, dict]:
    """The one GPU worker group and its Ray container."""
    groups = [g for g in cluster_spec(doc)["workerGroupSpecs"]
              if GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(groups) == 1, "expected one GPU worker group"
    return groups[0], groups[0]["template"]["spec"]["containers"][0]


def entrypoint(doc: dict) -> tuple[str, JobConfig]:
    """(entry script, resolved config) of a RayJob's ``python SCRIPT --config PRESET [--teacher T] key=value``."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:1] == ["python"] and argv[1] in SCRIPT_RECIPES, argv[:2]
    preset, overrides, rest = None, [], iter(argv[2:])
    for arg in rest:
        if arg == "--config":
            preset = next(rest)
        elif arg == "--teacher":
            overrides.append(f"distill.teacher={next(rest)}")
        else:
            assert "=" in arg and not arg.startswith("-"), f"unexpected argument {arg!r}"
            overrides.append(arg)
    assert preset is not None and (REPO / preset).is_file(), f"--config {preset} is not a file in the repository"
    return argv[1], load_config(REPO / preset, overrides)


def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.fullmatch(r"ray(\[[\w,]+\])?==([\d.]+)", d.split(";")[0].strip()) for d in deps
              if d.startswith("ray[") or d.startswith("ray=")]
    assert pin, "pyproject.toml must pin ray exactly (ray[...]==X.Y.Z): the image and manifests follow it"
    return pin.group(2)


JOBS = [p for p in MANIFESTS if load(p)["kind"] == "RayJob"]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


def test_there_are_the_pretraining_distillation_sweep_and_interactive_manifests():
    assert {p.name for p in MANIFESTS} >= {"rayjob-pretrain-8b.yaml", "rayjob-distill-8b.yaml",
                                           "rayjob-tune-2b.yaml", "raycluster.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_every_manifest_validates_against_the_kuberay_crd_schema(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in SCHEMAS
    assert schema_errors(doc) == []


def test_a_misspelled_field_fails_the_schema_check():
    doc = load(K8S / "rayjob-pretrain-8b.yaml")
    for misspell in (
        lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes")),
        lambda d: gpu_workers(d)[0]["template"]["spec"].__setitem__("toleration", []),
        lambda d: gpu_workers(d)[1]["env"][1]["valueFrom"].__setitem__("secretKeyRefs", {}),
        lambda d: gpu_workers(d)[1]["resources"].__setitem__("limit", {}),
    ):
        broken = copy.deepcopy(doc)
        misspell(broken)
        assert schema_errors(broken), "the strict schema let a misspelled field through"


def test_the_image_is_rays_at_the_pinned_version_and_an_allowed_python():
    tag = re.search(r"^FROM rayproject/ray:(\S+)", (REPO / "infra/docker/Dockerfile").read_text(), re.M)
    assert tag, "infra/docker/Dockerfile must start FROM rayproject/ray:VERSION-pyXY-gpu (or -cuXYZ)"
    found = re.fullmatch(r"([\d.]+)-py3(\d+)-(gpu|cu\d+)", tag.group(1))
    assert found, f"unexpected Ray image tag {tag.group(1)}"
    assert found.group(1) == pinned_ray()
    lowest = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert int(found.group(2)) >= int(re.fullmatch(r">=3\.(\d+)", lowest).group(1))


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_every_cluster_runs_the_pinned_ray_in_one_image(path):
    doc = load(path)
    assert cluster_spec(doc)["rayVersion"] == pinned_ray()
    assert len({c["image"] for c in containers(doc)}) == 1


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_the_head_takes_no_work_and_gpu_workers_tolerate_gpu_taints(path):
    doc = load(path)
    assert cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    group, _ = gpu_workers(doc)
    tolerations = group["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == GPU and t["operator"] == "Exists" for t in tolerations)
    shm = [v for v in group["template"]["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert [m["mountPath"] for m in gpu_workers(doc)[1]["volumeMounts"] if m["name"] in {v["name"] for v in shm}] \
        == ["/dev/shm"]


@pytest.mark.parametrize("path", JOBS, ids=ids(JOBS))
def test_the_entrypoint_resolves_to_a_config_of_the_scripts_recipe(path):
    script, cfg = entrypoint(load(path))
    assert SCRIPT_RECIPES[script] in (None, cfg.recipe)
    assert cfg.cluster.use_gpu


@pytest.mark.parametrize("path", JOBS, ids=ids(JOBS))
def test_worker_gpus_equal_what_the_entrypoint_trains_on(path):
    doc = load(path)
    _, cfg = entrypoint(doc)
    group, container = gpu_workers(doc)
    gpus_per_pod = int(container["resources"]["limits"][GPU])
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a job's cluster has a fixed size"
    # A sweep runs tune.max_concurrent_trials jobs of cluster.num_workers at once; a job runs one.
    concurrent = cfg.tune.max_concurrent_trials if cfg.tune.space else 1
    assert cfg.tune.max_concurrent_trials or not cfg.tune.space, "a sweep's manifest says its concurrency"
    assert group["replicas"] * gpus_per_pod == cfg.cluster.num_workers * concurrent
    if cfg.cluster.shard_size:  # HSDP: one shard group per node, so all-gathers stay on NVLink
        assert cfg.cluster.shard_size == gpus_per_pod
    # Ray takes num-cpus from the CPU limit: the pod's ranks must fit in it with their reserved CPUs.
    ranks_per_pod = gpus_per_pod
    assert ranks_per_pod * cfg.cluster.cpus_per_worker < float(container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("path", JOBS, ids=ids(JOBS))
def test_node_caches_lie_on_the_workers_local_volume(path):
    doc = load(path)
    _, cfg = entrypoint(doc)
    mounts = [m["mountPath"] for m in gpu_workers(doc)[1]["volumeMounts"]]
    for key, where in (("data.cache_dir", cfg.data.cache_dir), ("run.cache_dir", cfg.run.cache_dir)):
        assert any(Path(where).is_relative_to(m) for m in mounts), f"{key}={where} is not on a mounted volume"


@pytest.mark.parametrize("path", JOBS, ids=ids(JOBS))
def test_jobs_finish_by_removing_their_cluster(path):
    spec = load(path)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("path", JOBS, ids=ids(JOBS))
def test_the_job_tracks_to_the_mlflow_server_in_the_pods_environment(path):
    doc = load(path)
    _, cfg = entrypoint(doc)
    for container in containers(doc):
        env = {e["name"]: e.get("value") for e in container["env"]}
        # The job reads mlflow.tracking_uri (an empty one means a local SQLite file), not the environment.
        assert env["MLFLOW_TRACKING_URI"] == cfg.mlflow.tracking_uri
        assert cfg.run.storage_path.startswith("s3://") and "AWS_ENDPOINT_URL" in env


def test_credentials_come_from_secrets_and_every_manifest_sets_the_same_environment():
    envs = {p.name: [c["env"] for c in containers(load(p))] for p in MANIFESTS}
    first = next(iter(envs.values()))[0]
    for name, per_container in envs.items():
        for env in per_container:
            assert env == first, f"{name}: the pods' environment differs from {MANIFESTS[0].name}'s"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        (entry,) = [e for e in first if e["name"] == var]
        assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], var

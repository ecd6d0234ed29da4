"""The cluster configs (cluster/, runtime_env.yaml) checked offline: the launcher YAML against the
schema inside the ray package, the KubeRay manifests against the fields the job relies on, the
project image's Dockerfile and every image's Ray and Python against pyproject.toml and each other,
and each validator shown to reject a broken copy (a check that accepts everything proves nothing).

    python cluster/validate.py     # the same checks as a command
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_validate():
    spec = importlib.util.spec_from_file_location("cluster_validate", ROOT / "cluster/validate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


V = _load_validate()


def load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


@pytest.fixture(scope="module")
def launcher():
    return load("cluster/aws-l40s.yaml")


@pytest.fixture(scope="module")
def raycluster():
    return load("cluster/kuberay/raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob():
    return load("cluster/kuberay/rayjob.yaml")


def test_every_shipped_config_is_valid():
    files = V.config_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"runtime_env.yaml", "cluster/aws-l40s.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/kuberay/rayjob.yaml"} <= names
    assert {f: V.check_file(f) for f in files} == {f: [] for f in files}


def test_launcher_is_checked_against_the_schema_inside_ray(launcher):
    schema = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert schema.is_file()
    assert V.check_launcher(launcher) == []
    l40s = launcher["available_node_types"]["l40s"]
    assert l40s["node_config"]["InstanceType"].startswith("g6e.") and l40s["resources"]["GPU"] == 4
    assert 0 <= l40s["min_workers"] < l40s["max_workers"] <= launcher["max_workers"]
    # a field the schema does not know is rejected (node types allow no extra keys)
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["l40s"]["gpus"] = 4
    problems = V.check_launcher(bad)
    assert any(p.startswith("ray schema:") and "gpus" in p for p in problems), problems
    # so is a wrong type, and a head type that is not among the node types
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["l40s"]["max_workers"] = "two"
    assert any(p.startswith("ray schema:") for p in V.check_launcher(bad))
    bad = copy.deepcopy(launcher)
    bad["head_node_type"] = "nope"
    assert any("head_node_type" in p for p in V.check_launcher(bad))


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c["available_node_types"]["l40s"]["node_config"].update(InstanceType="m6i.4xlarge"), "g6e"),
    (lambda c: c["available_node_types"]["l40s"]["resources"].pop("GPU"), "resources.GPU"),
    (lambda c: c["available_node_types"]["l40s"].pop("max_workers"), "autoscaling bounds"),
    (lambda c: c["docker"].update(worker_image="rayproject/ray:2.9.0-py311-gpu"), "image"),
    (lambda c: c["docker"].update(worker_run_options=[]), "--gpus"),
    (lambda c: c.update(initialization_commands=[]), "mounts the shared"),
])
def test_launcher_rejects_what_the_job_relies_on(launcher, breakage, expected):
    bad = copy.deepcopy(launcher)
    breakage(bad)
    problems = V.check_launcher(bad)
    assert any(expected in p for p in problems), problems


def test_manifests_are_valid_and_the_rayjob_runs_the_same_cluster(raycluster, rayjob):
    assert V.check_kuberay(raycluster) == []
    assert V.check_kuberay(rayjob) == []
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    group = raycluster["spec"]["workerGroupSpecs"][0]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4
    version = raycluster["spec"]["rayVersion"]
    assert worker["image"] == f"rayproject/ray:{version}-py311-gpu", "image and rayVersion agree"
    # the cluster's Ray and the one installed here are both in the range pyproject.toml allows
    assert V.supported_ray() == ">=2.60,<2.61"
    assert V._ray_ok(version) and V._ray_ok(ray.__version__)


@pytest.mark.parametrize("version, ok", [("2.60.0", True), ("2.60.7", True), ("2.59.1", False), ("2.61.0", False),
                                         ("latest", False)])
def test_a_ray_version_is_judged_by_the_supported_range_not_by_the_installed_one(raycluster, version, ok):
    bad = copy.deepcopy(raycluster)
    bad["spec"]["rayVersion"] = version
    for group in [bad["spec"]["headGroupSpec"], *bad["spec"]["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            c["image"] = f"rayproject/ray:{version}-py311-gpu"
    problems = V.check_kuberay(bad)
    assert (problems == []) == ok, problems


def test_runtime_env_matches_pyproject_and_the_rayjob(rayjob):
    env = load("runtime_env.yaml")
    assert V.check_runtime_env(env) == []
    assert "torch==2.13.0" in env["pip"]["packages"]
    job_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert job_env["pip"]["packages"] == env["pip"]["packages"]
    assert job_env["env_vars"] == env["env_vars"]
    bad = copy.deepcopy(env)
    bad["pip"]["packages"] = [p for p in bad["pip"]["packages"] if not p.startswith("peft")] + ["ray==2.60.0"]
    problems = V.check_runtime_env(bad)
    assert any("peft" in p for p in problems) and any("do not pip-install ray" in p for p in problems), problems


def _worker(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


@pytest.mark.parametrize("which, breakage, expected", [
    ("raycluster", lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
     "resources.limits['nvidia.com/gpu']"),
    ("rayjob", lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
     "resources.limits['nvidia.com/gpu']"),
    ("rayjob", lambda d: d["spec"].pop("entrypoint"), "entrypoint"),
    ("rayjob", lambda d: d["spec"].update(entrypoint="python ray_jobs/train.py --config configs/l40s.yaml "
                                                      "--set run.storage_path=outputs/ray"), "run.storage_path"),
    ("rayjob", lambda d: d["spec"].update(entrypoint="python ray_jobs/train.py --config configs/tiny.yaml"),
     "run.output_dir=outputs"),                                          # the folders of the config it names
    ("rayjob", lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    ("rayjob", lambda d: d["spec"].update(runtimeEnvYAML="pip: [torch==2.13.0]"), "working_dir"),
    ("raycluster", lambda d: _worker(d)["template"]["spec"].pop("tolerations"), "tolerate"),
    ("raycluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        image="rayproject/ray:latest"), "image"),
    ("raycluster", lambda d: _worker(d)["template"]["spec"]["containers"][0].update(volumeMounts=[]), "/mnt/shared"),
    ("raycluster", lambda d: _worker(d).update(minReplicas=3, replicas=1), "minReplicas"),
    ("raycluster", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    ("raycluster", lambda d: d["spec"].update(rayVersion="2.9.0"), "rayVersion"),
])
def test_manifest_validator_rejects_a_broken_copy(raycluster, rayjob, which, breakage, expected):
    bad = copy.deepcopy(raycluster if which == "raycluster" else rayjob)
    breakage(bad)
    problems = V.check_kuberay(bad)
    assert any(expected in p for p in problems), problems


# --- the node image and the container images, pinned (issue 24) -----------------------------------


@pytest.fixture(scope="module")
def dockerfile():
    return (ROOT / "cluster" / "Dockerfile").read_text()


def test_every_node_boots_a_pinned_ami_with_a_driver_for_cuda_12_8(launcher):
    """Without an ImageId Ray boots its default AMI (Deep Learning AMI Ubuntu 18.04 V71, CUDA
    11.2): a driver older than the L40S and than torch's cu128 wheels (>= 570)."""
    for name, node_type in launcher["available_node_types"].items():
        assert node_type["node_config"]["ImageId"] == V.DLAMI_SSM, name
    assert V.DLAMI_SSM.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-")


def _ami(value):
    def set_it(c):
        if value is None:
            c["available_node_types"]["l40s"]["node_config"].pop("ImageId")
        else:
            c["available_node_types"]["l40s"]["node_config"]["ImageId"] = value
    return set_it


def _default_ami():
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    return DEFAULT_AMI["us-east-1"]


@pytest.mark.parametrize("breakage, expected", [
    (_ami(None), "ImageId"),                                              # Ray's default AMI boots
    (_ami("latest_dlami"), "ImageId"),                                    # Ray's name for the same
    (lambda c: _ami(_default_ami())(c), "Ray's default AMI"),             # spelt out
    (_ami("resolve:ssm:/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id"),
     "NVIDIA driver"),                                                    # an AMI without the driver
    (_ami("ubuntu-22.04"), "ImageId"),                                   # neither an id nor a parameter
    (lambda c: c["docker"].update(head_image="rayproject/ray:2.60.1-py311-cpu"), "differ"),  # head != workers
    (lambda c: c["docker"].update(worker_image="rayproject/ray:2.60.0-py310-gpu"), "requires-python"),
    (lambda c: c["docker"].update(worker_image="rayproject/ray:latest-gpu"), "image"),
    (lambda c: c["docker"].update(worker_image="rayproject/ray:2.61.0-py311-gpu"), "pyproject.toml"),
])
def test_the_launcher_refuses_an_unpinned_or_stale_image(launcher, breakage, expected):
    bad = copy.deepcopy(launcher)
    breakage(bad)
    problems = V.check_launcher(bad)
    assert any(expected in p for p in problems), problems


def test_a_pinned_ami_id_is_accepted(launcher):
    good = copy.deepcopy(launcher)
    _ami("ami-0123456789abcdef0")(good)  # what `aws ssm get-parameter ... --query Parameter.Value` prints
    assert V.check_launcher(good) == []


def test_the_project_image_is_built_on_the_cluster_images_with_the_runtime_env_pins(dockerfile):
    assert V.check_dockerfile(dockerfile) == []
    base = V.dockerfile_base(dockerfile)
    assert base == "rayproject/ray:2.60.0-py311-gpu"
    # the same Ray and Python as every cluster image, in the range pyproject.toml allows
    assert V.check_images_agree(V.cluster_images()) == []
    assert {V.image_versions(i)[:2] for i in V.cluster_images().values()} == {("2.60.0", "3.11")}


@pytest.mark.parametrize("old, new, expected", [
    ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:2.59.0-py311-gpu", "pyproject.toml"),
    ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:2.60.0-py310-gpu", "requires-python"),
    ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM rayproject/ray:latest-gpu", "image"),
    ("FROM rayproject/ray:2.60.0-py311-gpu", "FROM nvidia/cuda:12.8.0-runtime-ubuntu22.04", "image"),
    ("torch==2.13.0", "torch==2.12.0", "runtime_env.yaml"),
    ("--index-url https://download.pytorch.org/whl/cu128", "", "download.pytorch.org"),
    ("runtime_env.yaml", "requirements.txt", "runtime_env.yaml"),
])
def test_the_dockerfile_check_rejects_a_planted_bad_value(dockerfile, old, new, expected):
    assert old in dockerfile
    problems = V.check_dockerfile(dockerfile.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_images_that_differ_between_files_are_refused():
    images = V.cluster_images()
    assert {"cluster/Dockerfile", "cluster/aws-l40s.yaml docker.worker_image",
            "cluster/kuberay/rayjob.yaml RayJob rayClusterSpec worker group l40s"} <= set(images)
    drifted = {**images, "cluster/kuberay/raycluster.yaml RayCluster head": "rayproject/ray:2.60.1-py311-cpu"}
    problems = V.check_images_agree(drifted)
    assert any("2.60.1" in p and "raycluster.yaml" in p for p in problems), problems
    python = {**images, "cluster/Dockerfile": "rayproject/ray:2.60.0-py312-gpu"}
    assert any("3.12" in p and "Dockerfile" in p for p in V.check_images_agree(python))


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: _worker(d)["template"]["spec"]["containers"][0].update(image="rayproject/ray:2.60.1-py311-gpu"),
     "rayVersion"),                                                        # an image of another Ray than declared
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        image="rayproject/ray:2.60.0-py312-cpu"), "Python"),              # head and workers on other Pythons
    (lambda d: _worker(d)["template"]["spec"]["containers"][0].update(image="rayproject/ray:nightly-py311-gpu"),
     "image"),
])
def test_kuberay_images_must_be_pinned_and_agree(raycluster, breakage, expected):
    bad = copy.deepcopy(raycluster)
    breakage(bad)
    problems = V.check_kuberay(bad)
    assert any(expected in p for p in problems), problems

"""Offline checks of the cluster configs, before anyone pays for a GPU:

    python cluster/validate.py            # every file in cluster/ and runtime_env.yaml; exit 1 on a problem

* ``aws-l40s.yaml``: filled with the AWS defaults and validated exactly as ``ray up`` does before
  it calls AWS (``prepare_config`` + ``validate_config``: the JSON schema shipped inside the ray
  package, ``ray/autoscaler/ray-schema.json``, plus Ray's own cross-field checks), then the fields
  this project relies on: an L40S (g6e) worker type with GPUs and autoscaling bounds, a pinned
  AMI with an NVIDIA driver for CUDA 12.8 on every node type (:func:`check_ami`), pinned images
  of the Ray and Python pyproject.toml allows, the same on head and workers, GPUs passed to the
  container, the shared mount and cache path.
* ``kuberay/*.yaml`` (``RayCluster``, ``RayJob``, ``ray.io/v1``): no schema ships offline, so the
  fields the job relies on are checked by name: pinned images of the declared ``rayVersion``,
  the entrypoint and its run folders on shared storage, GPU limits and tolerations, the shared
  volume on every pod, ``shutdownAfterJobFinishes``, the runtime environment.
* ``Dockerfile`` (the project's node image): built on a pinned Ray image of pyproject.toml's Ray
  and Python, torch pinned as in runtime_env.yaml from PyTorch's CUDA index, then runtime_env.yaml's
  packages.
* ``runtime_env.yaml``: torch pinned, the same packages as ``pyproject.toml`` (without ray).
* Across files (:func:`check_images_agree`): every image above runs the same Ray and Python.

Each check returns every problem it finds (an empty list means valid), so one run lists them all.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # catvton's config loader, whatever directory this runs from

from catvton.config import ConfigError, load_config  # noqa: E402
SHARED = "/mnt/shared"
"""Where every node mounts the shared file system (latent cache, checkpoints, outputs)."""
GPU_KEY = "nvidia.com/gpu"


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def supported_ray() -> str:
    """The Ray versions the project supports: the specifier of its ``ray`` dependency in
    pyproject.toml (e.g. ``>=2.60,<2.61``), which the cluster's Ray must satisfy too."""
    ray_dep = next(d for d in _project()["dependencies"] if re.match(r"ray(\[|[<>=!~ ]|$)", d))
    return re.sub(r"^ray(\[[^\]]*\])?", "", ray_dep).strip()


def supported_python() -> str:
    """pyproject.toml's ``requires-python`` (e.g. ``>=3.11,<3.13``): the images' Python too."""
    return _project()["requires-python"]


def _in(version: Any, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return isinstance(version, str) and Version(version) in SpecifierSet(specifier)
    except InvalidVersion:
        return False


def _ray_ok(version: Any) -> bool:
    return _in(version, supported_ray())


IMAGE = re.compile(r"^(?:rayproject/ray|(?:[\w.-]+(?::\d+)?/)*catvton-ray):(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)"
                   r"-(?P<kind>cpu|gpu|cu\d+)(?:@sha256:[0-9a-f]{64})?$")
"""A pinned Ray image: ``rayproject/ray:<X.Y.Z>-py<NNN>-<cpu|gpu|cuNNN>``, or the project's own
(``<registry>/catvton-ray:<the same tag as its base>``, cluster/Dockerfile), optionally by digest.
``latest``, ``nightly`` or a version without its patch number are not pinned."""


def image_versions(image: Any) -> tuple[str, str, str] | None:
    """``(ray, python, kind)`` of a pinned Ray image (:data:`IMAGE`), e.g. ``("2.60.0", "3.11",
    "gpu")``; None for anything else."""
    m = IMAGE.match(image) if isinstance(image, str) else None
    return (m["ray"], f"{m['py'][0]}.{m['py'][1:]}", m["kind"]) if m else None


def _image_ok(image: Any, what: str) -> list[str]:
    versions = image_versions(image)
    if versions is None:
        return [f"{what}: image {image!r} must be pinned, rayproject/ray:<X.Y.Z>-py<NNN>-<cpu|gpu> (or the project's "
                f"<registry>/catvton-ray with that tag, cluster/Dockerfile), with a Ray the project supports "
                f"({supported_ray()}, pyproject.toml); not latest or nightly"]
    ray, python, _ = versions
    problems = []
    if not _ray_ok(ray):
        problems.append(f"{what}: image {image!r} has Ray {ray}, outside the range pyproject.toml allows "
                        f"({supported_ray()})")
    if not _in(python, supported_python()):
        problems.append(f"{what}: image {image!r} has Python {python}, outside pyproject.toml's requires-python "
                        f"({supported_python()})")
    return problems


def check_images_agree(images: dict[str, Any]) -> list[str]:
    """Problems of images (``{where: image}``) that do not all run the same Ray and Python: a job's
    driver, its workers and the project image must (Ray refuses other versions in one cluster, and
    what is pickled on one Python must load on the other)."""
    versions = {where: image_versions(image)[:2] for where, image in images.items() if image_versions(image)}
    if len(set(versions.values())) <= 1:
        return []
    ray, python = Counter(versions.values()).most_common(1)[0][0]
    return [f"{where}: image {images[where]!r} (Ray {v[0]}, Python {v[1]}) differs from the others' Ray {ray}, "
            f"Python {python}: every node and the project image must run the same Ray and Python"
            for where, v in versions.items() if v != (ray, python)]


# ---------------------------------------------------------------------------------------------
# Cluster launcher (AWS)


DLAMI_SSM = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
"""The nodes' AMI: AWS's "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)", an SSM
parameter that EC2 resolves when it launches a node (``RunInstances`` accepts ``resolve:ssm:``
in ``ImageId``; Ray passes ``node_config`` to it unchanged). Its NVIDIA driver (580 and later in
2026) is at least the 570 that CUDA 12.8 needs: torch's cu128 wheels in cluster/Dockerfile,
without relying on CUDA's minor-version compatibility, which leaves out the PTX that Triton and
``torch.compile`` load. It has Docker and the NVIDIA container toolkit that ``docker:`` needs.
``aws ssm get-parameter --name <after resolve:ssm:>`` prints the ``ami-`` id it is today, to pin
one release (docs/cluster.md)."""
DLAMI_FAMILY = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-"


def _ray_default_amis() -> set[str]:
    try:  # Ray's AWS provider needs boto3, which `ray up` needs anyway
        from ray.autoscaler._private.aws.config import DEFAULT_AMI
    except ImportError:
        return set()
    return set(DEFAULT_AMI.values())


def check_ami(image_id: Any, what: str) -> list[str]:
    """Problems of a node type's ``ImageId``: unset (or ``latest_dlami``), Ray boots its default,
    the "AWS Deep Learning AMI (Ubuntu 18.04) V71.0" of CUDA 11.2, whose driver predates the
    L40S and CUDA 12.8. Accepted: :data:`DLAMI_SSM`'s family, or an ``ami-`` id (pinned by the
    user, e.g. what that parameter resolves to)."""
    fix = f"set it to {DLAMI_SSM} or the ami- id it resolves to (docs/cluster.md)"
    if not image_id or str(image_id).lower() == "latest_dlami":
        return [f"{what}: no pinned ImageId: Ray would boot its default AMI (Deep Learning AMI Ubuntu 18.04, CUDA "
                f"11.2), whose NVIDIA driver predates the L40S and torch's CUDA 12.8 (driver >= 570); {fix}"]
    image_id = str(image_id)
    if image_id in _ray_default_amis():
        return [f"{what}: ImageId {image_id} is Ray's default AMI (Deep Learning AMI Ubuntu 18.04, CUDA 11.2), whose "
                f"NVIDIA driver predates the L40S; {fix}"]
    if image_id.startswith("resolve:ssm:"):
        if image_id.startswith(DLAMI_FAMILY):
            return []
        return [f"{what}: ImageId {image_id} names another AMI family: the nodes need the NVIDIA driver (>= 570), "
                f"Docker and the NVIDIA container toolkit of the Deep Learning Base OSS Nvidia Driver GPU AMI; {fix}"]
    if re.fullmatch(r"ami-(?:[0-9a-f]{8}|[0-9a-f]{17})", image_id):
        return []
    return [f"{what}: ImageId {image_id!r} is neither an AMI id (ami-...) nor resolve:ssm:<parameter>; {fix}"]


def check_launcher(config: dict) -> list[str]:
    """Problems of a cluster launcher config (see the module docstring)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems: list[str] = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, ValueError: the message names the field
        msg = getattr(e, "message", None) or str(e)
        path = "/".join(str(p) for p in getattr(e, "absolute_path", []) or [])
        problems.append(f"ray schema: {msg}" + (f" (at {path})" if path else ""))
    if config.get("provider", {}).get("type") != "aws":
        problems.append("provider.type must be aws")

    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    gpu_types = {name: t for name, t in types.items()
                 if name != head and str(t.get("node_config", {}).get("InstanceType", "")).startswith("g6e.")}
    if not gpu_types:
        problems.append("no worker node type with a g6e (L40S) InstanceType")
    for name, t in gpu_types.items():
        if int((t.get("resources") or {}).get("GPU", 0)) < 1:
            problems.append(f"node type {name}: resources.GPU must be at least 1")
        lo, hi = t.get("min_workers"), t.get("max_workers")
        if lo is None or hi is None:
            problems.append(f"node type {name}: set min_workers and max_workers (autoscaling bounds)")
        elif not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problems.append(f"node type {name}: need 0 <= min_workers ({lo}) <= max_workers ({hi})")
    if head in types and (types[head].get("resources") or {}).get("GPU"):
        problems.append(f"head node type {head} has GPUs: the head should be a CPU node")
    for name, t in types.items():
        problems += check_ami((t.get("node_config") or {}).get("ImageId"), f"node type {name}")

    docker = config.get("docker") or {}
    problems += _image_ok(docker.get("worker_image") or docker.get("image"), "docker worker")
    problems += _image_ok(docker.get("head_image") or docker.get("image"), "docker head")
    problems += check_images_agree(launcher_images(config))
    worker_opts = " ".join(docker.get("worker_run_options", []) + docker.get("run_options", []))
    if "--gpus" not in worker_opts:
        problems.append("docker: workers need --gpus all in worker_run_options (or run_options)")
    opts = " ".join(docker.get("run_options", []))
    if f"{SHARED}:{SHARED}" not in opts:
        problems.append(f"docker.run_options: mount the shared file system (-v {SHARED}:{SHARED})")
    if f"CATVTON_CACHE={SHARED}/" not in opts:
        problems.append(f"docker.run_options: --env CATVTON_CACHE={SHARED}/... (the latent cache must be shared)")
    mounts = " ".join(config.get("initialization_commands", []) + config.get("setup_commands", []))
    if not re.search(rf"mount\b.*\s{re.escape(SHARED)}\b", mounts):
        problems.append(f"no command mounts the shared file system at {SHARED} on the nodes")
    return problems


def launcher_images(config: dict) -> dict[str, Any]:
    """``{"docker.<key>": image}`` of a launcher config's container images."""
    docker = config.get("docker") or {}
    return {f"docker.{k}": docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)}


# ---------------------------------------------------------------------------------------------
# KubeRay


def _containers(pod_template: dict) -> list[dict]:
    return ((pod_template or {}).get("spec") or {}).get("containers") or []


def _check_pod(template: dict, what: str) -> list[str]:
    problems: list[str] = []
    containers = _containers(template)
    if not containers:
        return [f"{what}: template.spec.containers is empty"]
    volumes = {v.get("name"): v for v in (template.get("spec") or {}).get("volumes") or []}
    c = containers[0]
    problems += _image_ok(c.get("image"), what)
    mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
    vol = volumes.get(mounts.get(SHARED))
    if vol is None or "persistentVolumeClaim" not in vol:
        problems.append(f"{what}: mount a PersistentVolumeClaim volume at {SHARED} (shared storage)")
    env = {e.get("name"): e for e in c.get("env") or []}
    if not str((env.get("CATVTON_CACHE") or {}).get("value", "")).startswith(SHARED + "/"):
        problems.append(f"{what}: env CATVTON_CACHE must point under {SHARED} (the latent cache is read by every worker)")
    if "HF_TOKEN" not in env:
        problems.append(f"{what}: env HF_TOKEN (from a Secret) is needed for the gated FLUX.1-Fill-dev")
    return problems


def check_cluster_spec(spec: dict, what: str = "RayCluster") -> list[str]:
    """Problems of a ``RayCluster`` spec (also a ``RayJob``'s ``rayClusterSpec``)."""
    problems: list[str] = []
    if not isinstance(spec, dict):
        return [f"{what}: spec is missing"]
    if not _ray_ok(spec.get("rayVersion")):
        problems.append(f"{what}: rayVersion {spec.get('rayVersion')!r} must be a Ray the project supports "
                        f"({supported_ray()}, pyproject.toml)")
    images = pod_images(spec, what)
    problems += [f"{where}: image {image!r} is not of the declared rayVersion {spec.get('rayVersion')!r}"
                 for where, image in images.items()
                 if image_versions(image) and image_versions(image)[0] != spec.get("rayVersion")]
    problems += check_images_agree(images)
    head = spec.get("headGroupSpec") or {}
    if not head:
        problems.append(f"{what}: headGroupSpec is missing")
    else:
        problems += _check_pod(head.get("template") or {}, f"{what} head")
        limits = ((_containers(head.get("template")) or [{}])[0].get("resources") or {}).get("limits") or {}
        if GPU_KEY in limits:
            problems.append(f"{what} head: no {GPU_KEY} on the head (a CPU node)")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{what}: workerGroupSpecs is empty (no GPU workers)")
    for g in groups:
        name = f"{what} worker group {g.get('groupName', '?')}"
        template = g.get("template") or {}
        problems += _check_pod(template, name)
        res = ((_containers(template) or [{}])[0].get("resources") or {})
        gpus = (res.get("limits") or {}).get(GPU_KEY)
        if not isinstance(gpus, int) or gpus < 1:
            problems.append(f"{name}: resources.limits[{GPU_KEY!r}] must be a positive integer (got {gpus!r})")
        requested = (res.get("requests") or {}).get(GPU_KEY)
        if requested is not None and requested != gpus:
            problems.append(f"{name}: GPU requests ({requested}) must equal limits ({gpus})")
        tolerations = (template.get("spec") or {}).get("tolerations") or []
        if not any(t.get("key") == GPU_KEY for t in tolerations):
            problems.append(f"{name}: tolerate the {GPU_KEY} taint (GPU nodes are usually tainted)")
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        if not all(isinstance(v, int) for v in (lo, n, hi)) or not 0 <= lo <= n <= hi:
            problems.append(f"{name}: need integer 0 <= minReplicas <= replicas <= maxReplicas (got {lo}, {n}, {hi})")
    return problems


def pod_images(spec: dict, what: str) -> dict[str, Any]:
    """``{"<what> head" | "<what> worker group <name>": image}`` of a RayCluster spec's pods."""
    groups = [("head", (spec.get("headGroupSpec") or {}))]
    groups += [(f"worker group {g.get('groupName', '?')}", g) for g in spec.get("workerGroupSpecs") or []]
    return {f"{what} {name}": c[0].get("image") for name, g in groups if (c := _containers(g.get("template")))}


def check_kuberay(doc: dict) -> list[str]:
    """Problems of a KubeRay ``RayCluster`` or ``RayJob`` manifest."""
    if not isinstance(doc, dict):
        return ["not a YAML mapping"]
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} must be ray.io/v1")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is missing")
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        return problems + check_cluster_spec(spec)
    if kind != "RayJob":
        return problems + [f"kind {kind!r} must be RayCluster or RayJob"]
    entry = " ".join(str(spec.get("entrypoint") or "").split())
    if not entry.startswith("python ray_jobs/train.py"):
        problems.append(f"RayJob: entrypoint {entry!r} must run python ray_jobs/train.py")
    problems += [f"RayJob: {p}" for p in entrypoint_storage_problems(entry)]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("RayJob: shutdownAfterJobFinishes must be true (the GPU cluster goes away with the job)")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    except yaml.YAMLError as e:
        env = {}
        problems.append(f"RayJob: runtimeEnvYAML does not parse: {e}")
    if not env.get("working_dir"):
        problems.append("RayJob: runtimeEnvYAML needs a working_dir (a zip URI of the code)")
    problems += [f"RayJob runtimeEnvYAML: {p}" for p in check_runtime_env(env)]
    if "clusterSelector" in spec:
        problems.append("RayJob: clusterSelector reuses a cluster, which shutdownAfterJobFinishes cannot delete")
    return problems + check_cluster_spec(spec.get("rayClusterSpec"), "RayJob rayClusterSpec")


def entrypoint_storage_problems(entry: str) -> list[str]:
    """Problems of the run folders a ``python ray_jobs/train.py --config ... --set ...``
    entrypoint trains with (its config file, then its overrides): on more than one node they must
    be on shared storage, ``run.storage_path`` under /mnt/shared/ or s3:// / gs://,
    ``run.output_dir`` under /mnt/shared/."""
    try:
        args = shlex.split(entry)
    except ValueError as e:
        return [f"entrypoint does not parse: {e}"]
    config = next((b for a, b in zip(args, args[1:]) if a == "--config"), "configs/tiny.yaml")
    sets = [b for a, b in zip(args, args[1:]) if a == "--set"]
    try:
        run = load_config(ROOT / config, sets).run
    except (ConfigError, OSError) as e:
        return [f"entrypoint's config {config} with {sets}: {e}"]
    problems = []
    if not re.match(rf"({re.escape(SHARED)}/|s3://|gs://)", run.storage_path):
        problems.append(f"entrypoint trains with run.storage_path={run.storage_path}: not on shared storage "
                        f"({SHARED}/... or s3://); set it in {config} or with --set")
    if not run.output_dir.startswith(SHARED + "/"):
        problems.append(f"entrypoint trains with run.output_dir={run.output_dir}: not on shared storage "
                        f"({SHARED}/...); set it in {config} or with --set")
    return problems


# ---------------------------------------------------------------------------------------------
# Dockerfile (the project's node image)


def dockerfile_base(text: str) -> str | None:
    """The image of the Dockerfile's first ``FROM`` (without ``--platform=...`` and ``AS name``)."""
    for line in text.splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            images = [w for w in words[1:] if not w.startswith("--")]
            return images[0] if images else None
    return None


def runtime_env_torch() -> str | None:
    """runtime_env.yaml's ``torch==X.Y.Z`` pin."""
    packages = (yaml.safe_load((ROOT / "runtime_env.yaml").read_text()).get("pip") or {}).get("packages") or []
    return next((p.strip() for p in packages if re.fullmatch(r"torch==\S+", p.strip())), None)


def check_dockerfile(text: str) -> list[str]:
    """Problems of cluster/Dockerfile: its base a pinned GPU Ray image of pyproject.toml's Ray and
    Python; torch pinned as runtime_env.yaml pins it, from PyTorch's CUDA wheel index (PyPI's
    default wheel may be built for another CUDA than the nodes' driver supports); then the
    packages of runtime_env.yaml, so a job's ``pip`` finds them installed."""
    base = dockerfile_base(text)
    problems = _image_ok(base, "Dockerfile FROM")
    if image_versions(base) and image_versions(base)[2] == "cpu":
        problems.append(f"Dockerfile FROM: {base!r} is a CPU image; the project image is for the GPU nodes (-gpu)")
    torch = runtime_env_torch()
    pins = re.findall(r"torch==\S+", text)
    if torch not in pins:
        problems.append(f"Dockerfile: install {torch} (runtime_env.yaml's pin), found {pins or 'no torch pin'}")
    if not re.search(r"--index-url\s+https://download\.pytorch\.org/whl/cu\d+", text):
        problems.append("Dockerfile: install torch with --index-url https://download.pytorch.org/whl/cu128 (its CUDA "
                        "12.8 build, for the nodes' driver >= 570)")
    if not re.search(r"^\s*COPY\s+runtime_env\.yaml\s", text, re.MULTILINE):
        problems.append("Dockerfile: COPY runtime_env.yaml and install its pip packages: the image must hold what a "
                        "job's runtime env would install")
    return problems


# ---------------------------------------------------------------------------------------------
# runtime_env.yaml


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def check_runtime_env(env: dict) -> list[str]:
    """Problems of a runtime environment: torch pinned, pip = pyproject's dependencies minus ray."""
    pip = env.get("pip")
    packages = pip.get("packages") if isinstance(pip, dict) else pip
    if not packages:
        return ["pip.packages is empty: the cluster image has only Ray"]
    problems: list[str] = []
    if not any(re.fullmatch(r"torch==\d+\.\d+\.\d+", p.strip()) for p in packages):
        problems.append("pin torch exactly (torch==X.Y.Z): GPU nodes must run the tested build")
    names = {_name(p) for p in packages}
    want = {_name(d) for d in pyproject_dependencies()} - {"ray"}
    if names - want:
        problems.append(f"pip has packages pyproject.toml lacks: {sorted(names - want)}")
    if want - names:
        problems.append(f"pip lacks pyproject.toml dependencies: {sorted(want - names)}")
    if "ray" in names:
        problems.append("do not pip-install ray in a runtime env: the cluster's Ray must match the client's")
    return problems


# ---------------------------------------------------------------------------------------------


def check_file(path: Path) -> list[str]:
    """Problems of one config file, by what it is."""
    if path.name == "Dockerfile":
        return check_dockerfile(path.read_text())
    doc = yaml.safe_load(path.read_text())
    if path.name == "runtime_env.yaml":
        return check_runtime_env(doc)
    if isinstance(doc, dict) and "available_node_types" in doc:
        return check_launcher(doc)
    if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return check_kuberay(doc)
    return []  # e.g. the PersistentVolumeClaim: plain Kubernetes, nothing project-specific


def config_files() -> list[Path]:
    return [ROOT / "runtime_env.yaml", *sorted((ROOT / "cluster").rglob("*.yaml")), ROOT / "cluster" / "Dockerfile"]


def cluster_images() -> dict[str, Any]:
    """Every Ray image of the config files, ``{"<file> <where>": image}``."""
    images: dict[str, Any] = {}
    for path in config_files():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "Dockerfile":
            images[rel] = dockerfile_base(path.read_text())
            continue
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            continue
        if "available_node_types" in doc:
            images.update({f"{rel} {k}": v for k, v in launcher_images(doc).items()})
        elif doc.get("kind") == "RayCluster":
            images.update({f"{rel} {k}": v for k, v in pod_images(doc.get("spec") or {}, "RayCluster").items()})
        elif doc.get("kind") == "RayJob":
            spec = (doc.get("spec") or {}).get("rayClusterSpec") or {}
            images.update({f"{rel} {k}": v for k, v in pod_images(spec, "RayJob rayClusterSpec").items()})
    return images


def main() -> int:
    bad = 0
    for path in config_files():
        problems = check_file(path)
        rel = path.relative_to(ROOT)
        print(f"{'OK  ' if not problems else 'FAIL'} {rel}")
        for p in problems:
            print(f"       - {p}")
        bad += bool(problems)
    images = cluster_images()
    problems = check_images_agree(images)
    same = sorted({f"Ray {v[0]}, Python {v[1]}" for v in map(image_versions, images.values()) if v})
    print(f"{'OK  ' if not problems else 'FAIL'} images: {', '.join(same)} in all {len(images)}")
    for p in problems:
        print(f"       - {p}")
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())

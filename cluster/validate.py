"""Offline checks of the cluster configs, before anyone pays for a GPU:

    python cluster/validate.py            # every file in cluster/ and runtime_env.yaml; exit 1 on a problem

* ``aws-l40s.yaml``: filled with the AWS defaults and validated exactly as ``ray up`` does before
  it calls AWS (``prepare_config`` + ``validate_config``: the JSON schema shipped inside the ray
  package, ``ray/autoscaler/ray-schema.json``, plus Ray's own cross-field checks), then the fields
  this project relies on: an L40S (g6e) worker type with GPUs and autoscaling bounds, images of
  the installed Ray version, GPUs passed to the container, the shared mount and cache path.
* ``kuberay/*.yaml`` (``RayCluster``, ``RayJob``, ``ray.io/v1``): no schema ships offline, so the
  fields the job relies on are checked by name: images, entrypoint, GPU limits and tolerations,
  the shared volume on every pod, ``shutdownAfterJobFinishes``, the runtime environment.
* ``runtime_env.yaml``: torch pinned, the same packages as ``pyproject.toml`` (without ray).

Each check returns every problem it finds (an empty list means valid), so one run lists them all.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = "/mnt/shared"
"""Where every node mounts the shared file system (latent cache, checkpoints, outputs)."""
GPU_KEY = "nvidia.com/gpu"


def supported_ray() -> str:
    """The Ray versions the project supports: the specifier of its ``ray`` dependency in
    pyproject.toml (e.g. ``>=2.60,<2.61``), which the cluster's Ray must satisfy too."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_dep = next(d for d in deps if re.match(r"ray(\[|[<>=!~ ]|$)", d))
    return re.sub(r"^ray(\[[^\]]*\])?", "", ray_dep).strip()


def _ray_ok(version: Any) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return isinstance(version, str) and Version(version) in SpecifierSet(supported_ray())
    except InvalidVersion:
        return False


def _image_ok(image: Any, what: str) -> list[str]:
    m = re.match(r"^rayproject/ray:([0-9][^-]*)-", image) if isinstance(image, str) else None
    if m is None or not _ray_ok(m.group(1)):
        return [f"{what}: image {image!r} must be rayproject/ray:<version>-<python>-<cpu|gpu> with a Ray the "
                f"project supports ({supported_ray()}, pyproject.toml)"]
    return []


# ---------------------------------------------------------------------------------------------
# Cluster launcher (AWS)


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

    docker = config.get("docker") or {}
    problems += _image_ok(docker.get("worker_image") or docker.get("image"), "docker worker")
    problems += _image_ok(docker.get("head_image") or docker.get("image"), "docker head")
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
    if not re.search(rf"run\.storage_path=({re.escape(SHARED)}/|s3://|gs://)", entry):
        problems.append(f"RayJob: entrypoint must set run.storage_path on shared storage ({SHARED}/... or s3://)")
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
    doc = yaml.safe_load(path.read_text())
    if path.name == "runtime_env.yaml":
        return check_runtime_env(doc)
    if isinstance(doc, dict) and "available_node_types" in doc:
        return check_launcher(doc)
    if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return check_kuberay(doc)
    return []  # e.g. the PersistentVolumeClaim: plain Kubernetes, nothing project-specific


def config_files() -> list[Path]:
    return [ROOT / "runtime_env.yaml", *sorted((ROOT / "cluster").rglob("*.yaml"))]


def main() -> int:
    bad = 0
    for path in config_files():
        problems = check_file(path)
        rel = path.relative_to(ROOT)
        print(f"{'OK  ' if not problems else 'FAIL'} {rel}")
        for p in problems:
            print(f"       - {p}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

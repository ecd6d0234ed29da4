"""``serve/config.yaml`` itself: the application ``serve run serve/config.yaml`` builds from it;
then every ``serve/*.yaml`` (the production ``serve/config.l40s.yaml`` too) built the same way,
each model replica on CUDA with a GPU of its own and no GPU elsewhere.

No server is started. The file goes through the steps Serve's controller takes for a config
file (Ray 2.60's own functions): ``ServeDeploySchema`` validation, the ``import_path`` builder
called with the file's ``args``, ``build_app``, the deployment arguments, and the ``deployments:``
section applied on top (``override_deployment_info``). The test then reads what each replica
would get: autoscaling, queue limits, back-pressure, actor resources, environment, init args.

The file's LoRA folders are relative to the repository root; the root is pointed at a temporary
folder holding ``outputs/tiny-lora/lora``, so the file is read exactly as written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve" / "config.yaml"
pytestmark = pytest.mark.ray  # deployment arguments carry the driver's Ray job id


def deployed(app_schema) -> dict:
    """``{deployment name: DeploymentInfo}`` as the controller holds them after a deploy."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info, get_deploy_args

    app = call_user_app_builder_with_args_if_necessary(import_attr(app_schema.import_path), app_schema.args)
    built = build_app(app, name=app_schema.name, default_runtime_env={})
    built.validate_single_fastapi_ingress()
    infos = {}
    for dep in built.deployments:
        ingress = dep.name == built.ingress_deployment_name
        args = get_deploy_args(name=dep.name, replica_config=dep._replica_config, ingress=ingress,
                               deployment_config=dep._deployment_config, version="test",
                               route_prefix=app_schema.route_prefix if ingress else None)
        infos[dep.name] = deploy_args_to_deployment_info(**args, app_name=app_schema.name)
    return {"ingress": built.ingress_deployment_name, **override_deployment_info(infos, app_schema)}


@pytest.fixture()
def repo_root(tmp_path, monkeypatch):
    """A repository root in which only the default training run's LoRA exists (and the presets:
    the build reads the model config to know whether the model runs on a GPU)."""
    import catvton.infer.serving as serving

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "outputs" / "tiny-lora" / "lora").mkdir(parents=True)
    (tmp_path / "outputs" / "tiny-lora" / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    monkeypatch.setattr(serving, "REPO_ROOT", tmp_path)
    return tmp_path


@pytest.fixture()
def schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


def test_the_file_is_a_valid_serve_config_for_one_app_on_loopback(schema):
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    assert [a.name for a in schema.applications] == ["tryon"]
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert app.runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_the_built_app_has_the_files_limits_and_autoscaling(ray_session, schema, repo_root):
    from ray.serve.config import AutoscalingConfig

    from catvton.infer.serving import pick_lora, serve_config_from_dict

    app = schema.applications[0]
    infos = deployed(app)
    assert infos.pop("ingress") == "TryOnIngress"
    assert sorted(infos) == ["TryOnIngress", "TryOnModel"]
    model, ingress = infos["TryOnModel"], infos["TryOnIngress"]
    settings = serve_config_from_dict(app.args)

    m = model.deployment_config
    auto = m.autoscaling_config
    assert isinstance(auto, AutoscalingConfig)
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 2, 4)
    assert (auto.upscale_delay_s, auto.downscale_delay_s) == (10, 120)
    assert "num_replicas" not in m.user_configured_option_names, "autoscaled, not a fixed count"
    assert (m.max_ongoing_requests, m.max_queued_requests) == (8, 16)
    # the file's own rules: a replica takes a full batch, and more than autoscaling's target
    assert m.max_ongoing_requests >= settings.max_batch_size == 4
    assert m.max_ongoing_requests >= auto.target_ongoing_requests
    assert (m.backpressure_config.status_code, m.backpressure_config.retry_after_s) == (503, settings.retry_after_s)
    assert model.replica_config.ray_actor_options["num_cpus"] == 1
    assert model.replica_config.ray_actor_options["runtime_env"]["env_vars"] == {
        "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}

    i = ingress.deployment_config
    assert i.autoscaling_config is None and i.num_replicas == 1
    assert (i.max_ongoing_requests, i.max_queued_requests) == (64, 128)
    assert ingress.replica_config.ray_actor_options["num_cpus"] == 0, "the ingress holds no model: no CPU reserved"
    assert ingress.route_prefix == "/"

    # what each replica is constructed with: the file's args, untouched
    (model_args,) = model.replica_config.init_args
    assert model_args == app.args
    handle, ingress_args = ingress.replica_config.init_args
    assert ingress_args == app.args and "TryOnModel" in repr(handle)
    assert settings.torch_threads == 1 and settings.max_steps == 50 and settings.api_key == ""
    assert settings.parser == "", "no parser by default: requests must send a mask"
    # the sweep's release is looked for first; here only the training run's LoRA exists
    assert pick_lora(settings) == repo_root / "outputs" / "tiny-lora" / "lora"
    (repo_root / "outputs" / "tiny-sweep" / "release").mkdir(parents=True)
    (repo_root / "outputs" / "tiny-sweep" / "release" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert pick_lora(settings) == repo_root / "outputs" / "tiny-sweep" / "release"


def test_without_a_trained_lora_the_build_fails_naming_the_commands(ray_session, schema, tmp_path, monkeypatch):
    import catvton.infer.serving as serving
    from catvton.config import ConfigError

    monkeypatch.setattr(serving, "REPO_ROOT", tmp_path)  # a fresh clone: nothing trained yet
    with pytest.raises(ConfigError) as e:
        deployed(schema.applications[0])
    msg = str(e.value)
    assert "outputs/tiny-sweep/release" in msg and "outputs/tiny-lora/lora" in msg
    assert "python ray_jobs/train.py" in msg and "lora: []" in msg


# --------------------------------------------------------------------------------------------
# Every serve config file, and the production one (serve/config.l40s.yaml, issue 24)

SERVE_FILES = sorted((ROOT / "serve").glob("*.yaml"))
L40S = ROOT / "serve" / "config.l40s.yaml"
SHARED = "/mnt/shared/"


def header(text: str) -> str:
    """The comment lines a config file starts with."""
    lines = text.splitlines()
    return "\n".join(lines[:next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])


def test_both_shipped_serve_configs_are_found():
    assert {p.name for p in SERVE_FILES} >= {"config.yaml", "config.l40s.yaml"}


@pytest.fixture()
def shared_storage(tmp_path, monkeypatch):
    """``/mnt/shared`` (the cluster's shared storage, docs/cluster.md) as a temporary folder, holding
    the production LoRA folders that serve/config.l40s.yaml names, so its paths are read as written."""
    import catvton.infer.serving as serving

    real = serving.repo_path
    root = tmp_path / "shared"
    monkeypatch.setattr(serving, "repo_path", lambda p: root / p[len(SHARED):] if str(p).startswith(SHARED) else real(p))
    for folder in ("outputs/sweep/release", "outputs/catvton-lora/lora"):
        (root / folder).mkdir(parents=True)
        (root / folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_every_serve_config_reserves_a_gpu_exactly_when_its_model_runs_on_cuda(ray_session, path, repo_root,
                                                                               shared_storage):
    """What the controller builds from each file (the ``deployments:`` section's ``ray_actor_options``
    replace the code's): a model on CUDA (catvton.infer.serving.wants_gpu) reserves a whole GPU; a CPU
    model reserves none (or it would never be scheduled on a machine without one); the ingress never."""
    from ray.serve.schema import ServeDeploySchema

    from catvton.infer.serving import model_config, pick_lora, serve_config_from_dict, wants_gpu

    text = path.read_text()
    assert f"serve run serve/{path.name}" in header(text) or f"serve deploy serve/{path.name}" in header(text), \
        "a config file's header gives the command that runs it"
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    settings = serve_config_from_dict(app.args)
    gpu = wants_gpu(settings, model_config(settings, pick_lora(settings)))
    infos = deployed(app)
    model = infos["TryOnModel"].replica_config.ray_actor_options
    assert (model.get("num_gpus", 0) >= 1) if gpu else (model.get("num_gpus", 0) == 0), (path.name, gpu, model)
    assert infos["TryOnIngress"].replica_config.ray_actor_options.get("num_gpus", 0) == 0
    for info in (infos["TryOnModel"], infos["TryOnIngress"]):  # Ray 2.60 shows an actor every GPU otherwise
        assert info.replica_config.ray_actor_options["runtime_env"]["env_vars"]["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"
    assert infos["TryOnModel"].deployment_config.max_ongoing_requests >= settings.max_batch_size, \
        "a replica takes at least a full batch, or batches never fill"


def test_the_l40s_file_serves_the_production_model_on_one_gpu_a_replica(ray_session, shared_storage):
    """serve/config.l40s.yaml built as ``serve deploy`` builds it: the production preset and LoRA
    folders on shared storage, the parser, CUDA, a GPU per replica, and the batch size from the
    measured serving peak (named in the file, next to the value)."""
    from ray.serve.schema import ServeDeploySchema

    from catvton.infer.serving import model_config, pick_lora, serve_config_from_dict, wants_gpu

    text = L40S.read_text()
    top = header(text)
    assert "serve deploy serve/config.l40s.yaml" in top and "serve run serve/config.l40s.yaml" in top
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    assert app.import_path == "serve.app:build_app"
    settings = serve_config_from_dict(app.args)
    assert settings.config == "configs/l40s.yaml" and settings.device == "cuda"
    assert settings.parser == "mattmdjaga/segformer_b2_clothes"
    assert settings.lora == [SHARED + "outputs/sweep/release", SHARED + "outputs/catvton-lora/lora"]
    assert pick_lora(settings) == shared_storage / "outputs" / "sweep" / "release"
    cfg = model_config(settings, pick_lora(settings))  # no training_config.json here: the preset
    assert cfg.model.base == "black-forest-labs/FLUX.1-Fill-dev" and wants_gpu(settings, cfg)
    assert settings.vae_slicing in ("auto", "on"), "a batch is decoded one image at a time on the GPU"
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("max_batch_size:"))
    assert "docs/PERFORMANCE.md" in line, "the batch size says where its memory figure comes from"

    infos = deployed(app)
    model, ingress = infos["TryOnModel"], infos["TryOnIngress"]
    assert model.replica_config.ray_actor_options["num_gpus"] == 1
    assert model.replica_config.ray_actor_options["num_cpus"] >= 1
    assert ingress.replica_config.ray_actor_options.get("num_gpus", 0) == 0
    assert ingress.replica_config.ray_actor_options["num_cpus"] == 0
    auto = model.deployment_config.autoscaling_config
    assert auto.min_replicas >= 1 and auto.max_replicas >= auto.min_replicas
    assert model.deployment_config.max_ongoing_requests >= max(settings.max_batch_size, auto.target_ongoing_requests)
    (model_args,) = model.replica_config.init_args
    assert model_args == app.args


def test_the_l40s_file_ships_the_code_and_the_libraries_of_runtime_env_yaml():
    """Serve's config files take remote working dirs only: the file names an archive of the code (as
    the RayJob does) and installs runtime_env.yaml's packages, kept in step here."""
    runtime = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    (app,) = yaml.safe_load(L40S.read_text())["applications"]
    env = app["runtime_env"]
    assert env["pip"] == runtime["pip"], "keep serve/config.l40s.yaml's pip list runtime_env.yaml's"
    assert env["working_dir"].startswith(("https://", "s3://")) and env["working_dir"].endswith(".zip")
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_cpu_default_points_to_the_gpu_file():
    assert "serve/config.l40s.yaml" in header(CONFIG.read_text())

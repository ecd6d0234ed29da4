"""``serve/config.yaml`` itself: the application ``serve run serve/config.yaml`` builds from it.

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
    """A repository root in which only the default training run's LoRA exists."""
    import catvton.infer.serving as serving

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
        "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}

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

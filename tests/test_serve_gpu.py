"""A model replica that runs on CUDA reserves a GPU (issue 24), checked without a GPU.

Ray 2.60 no longer hides the GPUs of a node from an actor that asks for none (ray#54868): a
replica with only ``num_cpus`` sees ``cuda:0`` and a model with ``device: auto`` would take it,
unreserved, beside whatever Ray put there. Two guards, both tested here:

- where the application is built (``serve.app.application`` / ``build_app``): settings whose model
  runs on CUDA (``device: cuda``, or ``auto`` with a GPU preset: the model config's
  ``train.use_gpu``) get ``num_gpus: 1`` on the model deployment, and explicit options that
  reserve none are refused, naming the fix;
- in the replica itself (``TryOnService.load``): CUDA asked but no GPU assigned by Ray refuses to
  load; ``auto`` without an assigned GPU runs on the CPU (the tiny default) or refuses (a GPU
  preset), never takes an unreserved GPU.

No model is loaded: the refusals come before any weights are read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catvton.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def actor_options(app) -> dict[str, dict]:
    """``{deployment name: ray_actor_options}`` of the application ``serve.app.application`` built."""
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    return {ingress.name: dict(ingress.ray_actor_options or {}), model.name: dict(model.ray_actor_options or {})}


@pytest.mark.parametrize("args", [
    {"device": "cuda", "lora": []},
    {"device": "auto", "lora": [], "config": "configs/l40s.yaml"},  # a GPU preset (train.use_gpu)
], ids=["cuda", "auto-gpu-preset"])
def test_settings_that_run_on_cuda_reserve_a_gpu_for_the_model_only(args):
    from serve.app import application

    options = actor_options(application(args))
    assert options["TryOnModel"].get("num_gpus", 0) >= 1, options
    assert options["TryOnModel"]["num_cpus"] >= 1
    assert options["TryOnIngress"].get("num_gpus", 0) == 0, "the ingress holds no model: no GPU"


def test_the_cpu_default_reserves_no_gpu():
    """The tiny config (device auto, train.use_gpu false) must schedule on a machine without GPUs."""
    from serve.app import application

    options = actor_options(application({"lora": []}))
    assert options["TryOnModel"].get("num_gpus", 0) == 0 and options["TryOnModel"]["num_cpus"] == 1


@pytest.mark.parametrize("actor", [{"num_cpus": 1}, {"num_cpus": 1, "num_gpus": 0}, {"num_gpus": 0.5}])
def test_explicit_model_options_without_a_whole_gpu_are_refused_naming_the_fix(actor):
    from serve.app import application

    with pytest.raises(ConfigError) as e:
        application({"device": "cuda", "lora": []}, model_options={"ray_actor_options": actor})
    msg = str(e.value)
    assert "num_gpus: 1" in msg and "TryOnModel" in msg and "device" in msg, msg


def test_explicit_model_options_with_a_gpu_are_kept():
    from serve.app import application

    options = actor_options(application({"device": "cuda", "lora": []},
                                        model_options={"ray_actor_options": {"num_cpus": 4, "num_gpus": 1}}))
    assert options["TryOnModel"] == {"num_cpus": 4, "num_gpus": 1}


# --- the replica's own rule --------------------------------------------------------------------

TINY = load_config(ROOT / "configs" / "tiny.yaml")
L40S = load_config(ROOT / "configs" / "l40s.yaml")


@pytest.mark.parametrize("device,cfg,cuda,gpus,expected", [
    ("cpu", L40S, True, [], "cpu"),           # asked for explicitly: the CPU, whatever is visible
    ("auto", TINY, False, None, "cpu"),       # a plain process without CUDA
    ("auto", TINY, True, None, "cuda"),       # a plain process with CUDA (not under Ray): as before
    ("auto", TINY, True, [], "cpu"),          # a Ray actor that reserved no GPU: not the visible one
    ("auto", TINY, True, [0], "cuda"),        # a Ray actor with its GPU
    ("auto", L40S, True, [2], "cuda"),
    ("cuda", TINY, True, ["0"], "cuda"),
    ("cuda", L40S, True, None, "cuda"),
])
def test_where_a_replica_puts_its_model(device, cfg, cuda, gpus, expected):
    from catvton.infer.serving import ServeConfig, serve_device

    assert serve_device(ServeConfig(device=device), cfg, cuda_available=cuda, gpu_ids=gpus) == expected


@pytest.mark.parametrize("device,cfg,cuda,gpus,words", [
    ("cuda", TINY, True, [], "reserved no GPU"),      # a Ray actor: CUDA visible, none reserved
    ("auto", L40S, True, [], "reserved no GPU"),      # a GPU preset in an actor without a GPU
    ("cuda", TINY, False, None, "no CUDA device"),    # not under Ray, no CUDA at all
])
def test_a_replica_that_would_use_an_unreserved_gpu_refuses(device, cfg, cuda, gpus, words):
    from catvton.infer.serving import ServeConfig, serve_device

    with pytest.raises(ConfigError) as e:
        serve_device(ServeConfig(device=device), cfg, cuda_available=cuda, gpu_ids=gpus)
    assert words in str(e.value)
    if gpus == []:
        assert "num_gpus: 1" in str(e.value), "the message names the fix"


@pytest.mark.ray
def test_a_replica_without_a_gpu_refuses_cuda_in_a_real_ray_actor(ray_session):
    """``TryOnService.load`` in a Ray actor that reserved no GPU, with ``device: cuda``: refused with
    the fix, before any model is read (on this CPU-only torch the old code died in CUDA's init)."""
    import ray

    @ray.remote(num_cpus=0)
    class Replica:
        def load(self, settings: dict):
            from catvton.infer.serving import TryOnService, serve_config_from_dict
            from catvton.offline import resolve

            try:  # resolved as the Serve app does, so that only the device can stop it
                TryOnService.load(serve_config_from_dict(settings), prepare=lambda c: resolve(c, log=lambda _: None))
            except Exception as e:  # noqa: BLE001  (the test looks at which error, by its text)
                return f"{type(e).__name__}: {e}"
            return "loaded"

        def gpu_ids(self):
            import os

            from catvton.infer.serving import ray_gpu_ids

            return ray_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    # the serve files' switch: an actor without a GPU sees none (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone)
    replica = Replica.options(runtime_env={"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}}).remote()
    try:
        answer = ray.get(replica.load.remote({"device": "cuda", "lora": [],
                                                         "overrides": ["model.transformer_override=null"]}), timeout=120)
        assert answer.startswith("ConfigError") and "reserved no GPU" in answer and "num_gpus: 1" in answer, answer
        assert ray.get(replica.gpu_ids.remote(), timeout=60) == ([], ""), "no GPU ids, and CUDA shows none"
        from catvton.infer.serving import ray_gpu_ids

        assert ray_gpu_ids() is None, "the driver is not a Ray worker: no reservation to check"
    finally:
        ray.kill(replica)

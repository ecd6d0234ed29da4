"""Many LoRAs on one base (issue 28, item 1), in the library: the registry's checks, named
adapters with least-recently-used eviction, and each model's picture equal, bit for bit, to the one a
service that loaded only that LoRA makes. tests/test_serve_models.py drives the same through Serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_lora, tiny_fill_case

from catvton import artifacts
from catvton.infer.registry import AdapterSet, check_release, scan_registry
from catvton.infer.request import InputError
from catvton.infer.serving import ServeConfig, TryOnService
from catvton.infer.tryon import TryOn

STEPS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base at 32x32 halves, a registry of three random LoRAs (m-a, m-b, m-c) and two broken
    folders, and one seeded canvas."""
    tmp = tmp_path_factory.mktemp("registry")
    cfg, _, canvas, mask = tiny_fill_case(tmp / "scratch", n=1, steps=STEPS)
    root = tmp / "registry"
    for k, name in enumerate(["m-a", "m-b", "m-c"]):
        random_lora(cfg, root / name, seed=k + 1, scale=0.1)
        (root / name / artifacts.TRAINING_CONFIG).write_text(json.dumps(cfg.to_dict()))  # as a release has it
    broken = root / "m-truncated"
    shutil.copytree(root / "m-a", broken)
    data = (broken / artifacts.LORA_WEIGHTS).read_bytes()
    (broken / artifacts.LORA_WEIGHTS).write_bytes(data[: len(data) // 2])
    other = root / "m-other-base"
    shutil.copytree(root / "m-b", other)
    training = json.loads((other / artifacts.TRAINING_CONFIG).read_text())
    training["model"]["transformer_override"] = "/models/someone-elses-transformer"
    (other / artifacts.TRAINING_CONFIG).write_text(json.dumps(training))
    return cfg, root, canvas, mask


def fill(tryon: TryOn, canvas, mask) -> np.ndarray:
    return tryon.fill_canvases(canvas, mask, seed=[7], steps=STEPS)


@pytest.fixture(scope="module")
def singles(world) -> dict[str, np.ndarray]:
    """What a service that loaded only one LoRA answers, per model."""
    cfg, root, canvas, mask = world
    return {name: fill(TryOn.load(cfg, lora=root / name), canvas, mask) for name in ("m-a", "m-b", "m-c")}


def test_the_registry_offers_good_releases_and_says_why_it_refuses_the_others(world):
    cfg, root, _, _ = world
    registry = scan_registry(root, cfg)
    assert sorted(registry.releases) == ["m-a", "m-b", "m-c"]
    assert sorted(registry.refused) == ["m-other-base", "m-truncated"]
    assert "not readable safetensors" in registry.refused["m-truncated"]
    assert "someone-elses-transformer" in registry.refused["m-other-base"]
    assert "serve it where that model runs" in registry.refused["m-other-base"]
    (root.parent / "not a model id").mkdir(exist_ok=True)
    release, why = check_release(root.parent / "not a model id", cfg)
    assert release is None and "not a model id" in why


def test_each_model_answers_as_a_server_with_only_that_lora_and_eviction_reloads(world, singles):
    cfg, root, canvas, mask = world
    base = TryOn.load(cfg)
    registry = scan_registry(root, cfg)
    adapters = AdapterSet(base.pipe, capacity=2)
    seen = {}
    for name in ("m-a", "m-b", "m-c", "m-a"):  # the third evicts m-a, the fourth reloads it (evicting m-b)
        with adapters.use(registry.releases[name]):
            seen.setdefault(name, []).append(fill(base, canvas, mask))
    assert adapters.loads == 4 and adapters.evictions == 2 and list(adapters.loaded) == ["m-c", "m-a"]
    for name, pictures in seen.items():
        for picture in pictures:
            assert np.array_equal(picture, singles[name]), name
    # the models differ from each other (the comparison above could not pass by all being the base)
    assert not np.array_equal(singles["m-a"], singles["m-b"]) and not np.array_equal(singles["m-b"], singles["m-c"])
    assert adapters.unload("m-a") and not adapters.unload("m-a")  # a second unload is harmless


def test_a_service_with_a_registry_names_its_models_and_refuses_an_unknown_one(world):
    cfg, root, _, _ = world
    service = TryOnService.from_config(cfg).use_registry(scan_registry(root, cfg))
    with pytest.raises(InputError) as e:
        service.release("m-z")
    assert e.value.status == 404 and e.value.field == "model" and "['m-a', 'm-b', 'm-c']" in e.value.message
    with pytest.raises(InputError) as e:
        service.release(None)  # no default model set
    assert e.value.status == 422 and "name a model" in e.value.message
    service.settings = ServeConfig(default_model="m-b")
    assert service.release(None).model_id == "m-b"
    listed = service.models()
    assert [m["id"] for m in listed["models"]] == ["m-a", "m-b", "m-c"]
    assert set(listed["refused"]) == {"m-other-base", "m-truncated"} and listed["loaded"] == []

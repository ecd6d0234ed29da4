"""Many LoRAs behind one application, through a real ``serve.run`` (issue 28, item 1): a registry of
three releases and two broken folders on one base, at most two adapters per replica; each model's
answer is the picture a single-LoRA application gives for the same request and seed, a model evicted
for a third is loaded again on its next request, an unknown model is a 404 naming the list, and a
broken release is refused with its reason while the others serve; an experiment's events survive a
redeploy of its application. tests/test_multi_lora.py checks the library side without Ray."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import requests
from conftest import random_lora, tiny_config
from PIL import Image
from serve_helpers import free_port, png

from catvton import artifacts

# ~3 min: four applications on one Serve (the registry, and a single-LoRA server per model to compare
# with); the default tier checks the same bit-identity and eviction without Serve in
# tests/test_multi_lora.py, and the traffic through the HTTP API in tests/test_shop_traffic.py
pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODELS = ("m-a", "m-b", "m-c")
METERED = "m-d"
"""Requested by the metrics test alone: its counts cannot include another test's requests that Ray
had not exported yet when the test began."""
STEPS = {"steps": "2", "seed": "5", "garment_type": "lower"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three releases trained (here: drawn) on the preset's base and transformer, as the server
    resolves them; a truncated copy and one trained on another transformer."""
    cfg = tiny_config()
    root = tmp_path_factory.mktemp("models")
    for k, name in enumerate((*MODELS, METERED)):
        random_lora(cfg, root / name, seed=10 + k, scale=0.1)
        (root / name / artifacts.TRAINING_CONFIG).write_text(json.dumps(cfg.to_dict()))
        (root / name / artifacts.METRICS).write_text(json.dumps({"val_loss": 0.5 + k / 10}))
    shutil.copytree(root / "m-a", root / "m-broken")
    weights = root / "m-broken" / artifacts.LORA_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.copytree(root / "m-b", root / "m-elsewhere")
    training = json.loads((root / "m-elsewhere" / artifacts.TRAINING_CONFIG).read_text())
    training["model"]["transformer_override"] = "/models/another-transformer"
    (root / "m-elsewhere" / artifacts.TRAINING_CONFIG).write_text(json.dumps(training))
    return root


@pytest.fixture(scope="module")
def servers(ray_session, registry):
    """``/`` serves the registry (two adapters a replica); ``/single-<id>`` serves one LoRA each."""
    from ray import serve

    from serve.app import application

    port = free_port()
    serve.shutdown()  # a Serve left by another module keeps its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 4}  # 2 CPUs: several replicas
    common = {"torch_threads": 1, "max_batch_size": 1}
    serve.run(application({**common, "registry": str(registry), "max_adapters": 2}, model_options=small),
              name="models", route_prefix="/")
    for name in MODELS:
        serve.run(application({**common, "lora": [str(registry / name)]}, model_options=small),
                  name=f"single-{name}", route_prefix=f"/single-{name}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _request(url: str, name: str | None = None, headers: dict | None = None, **data) -> requests.Response:
    rng = np.random.default_rng(0)
    person = rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)
    mask = np.zeros((128, 96), np.uint8)
    mask[64:120, 20:76] = 255
    files = {"person": ("p.png", png(person), "image/png"),
             "garment": ("g.png", png(np.full((60, 40, 3), (200, 40, 40), np.uint8)), "image/png"),
             "mask": ("m.png", png(mask), "image/png")}
    headers = {**(headers or {}), **({"x-tryon-model": name} if name else {})}
    return requests.post(f"{url}/v1/tryon", files=files, data={**STEPS, **data}, headers=headers, timeout=300)


def _image(r: requests.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_models_are_listed_with_their_figures_and_the_refused_with_their_reasons(servers):
    listed = requests.get(f"{servers}/v1/models", timeout=60).json()
    assert [m["id"] for m in listed["models"]] == [*MODELS, METERED]
    assert [m["metrics"]["val_loss"] for m in listed["models"]] == [0.5, 0.6, 0.7, 0.8]
    assert sorted(listed["refused"]) == ["m-broken", "m-elsewhere"]
    assert "not readable safetensors" in listed["refused"]["m-broken"]
    assert "another-transformer" in listed["refused"]["m-elsewhere"]


def test_each_model_answers_as_its_single_lora_server_and_an_evicted_one_reloads(servers):
    singles = {name: _image(_request(f"{servers}/single-{name}")) for name in MODELS}
    assert not np.array_equal(singles["m-a"], singles["m-b"]), "the models differ: the comparison can fail"
    for name in ("m-c", "m-b"):  # whatever other tests left loaded, the replica now holds [m-c, m-b]
        assert np.array_equal(_image(_request(servers, name)), singles[name]), name
    before = requests.get(f"{servers}/v1/models", timeout=60).json()
    answers = {}
    for name in ("m-a", "m-c", "m-a"):  # m-a evicts m-c (two adapters a replica), m-c evicts m-b, m-a is held
        r = _request(servers, name)
        assert r.headers["x-tryon-model"] == name
        answers.setdefault(name, []).append(_image(r))
    for name, images in answers.items():
        for image in images:
            assert np.array_equal(image, singles[name]), name
    info = requests.get(f"{servers}/v1/models", timeout=60).json()
    assert info["capacity"] == 2 and info["loaded"] == ["m-c", "m-a"], info
    assert (info["loads"] - before["loads"], info["evictions"] - before["evictions"]) == (2, 2), (before, info)
    # the form field names a model as the header does
    assert np.array_equal(_image(_request(servers, None, model="m-b")), singles["m-b"])


def test_an_unknown_or_broken_model_is_a_404_that_says_why_and_the_others_serve(servers):
    r = _request(servers, "m-nope")
    assert r.status_code == 404 and r.json()["field"] == "model"
    assert "['m-a', 'm-b', 'm-c', 'm-d']" in r.json()["error"]
    r = _request(servers, "m-broken")
    assert r.status_code == 404 and "not readable safetensors" in r.json()["error"]
    r = _request(servers)  # no model named and no default_model set
    assert r.status_code == 422 and r.json()["field"] == "model"
    # none of these loaded an adapter (the test above counts loads; the others serving is shown there)


def _scrape() -> dict[tuple[str, tuple], float]:
    """Ray's metrics endpoint of this node (Prometheus text), as {(sample name, sorted labels): value}."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker._global_node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if "tryon_" in s.name}


def _value(scraped: dict, name: str, **labels) -> float:
    """The sum over samples named ``name`` whose labels include ``labels`` (Ray adds the ``ray_``
    prefix; a counter's samples may carry ``_total``)."""
    return sum(v for (n, ls), v in scraped.items()
               if n.removeprefix("ray_") in (name, f"{name}_total") and all((k, v2) in ls for k, v2 in labels.items()))


def test_the_metrics_endpoint_counts_requests_per_model_and_adapter_loads(servers):
    """Ray exports the service's metrics on its Prometheus endpoint; after a known sequence of
    requests the counters moved by exactly that sequence (deltas: other tests share the server)."""
    import time

    before, deadline = _scrape(), time.monotonic() + 90
    while time.monotonic() < deadline:  # what other tests sent is exported first (Ray reports every few s)
        time.sleep(6)
        now = _scrape()
        if now == before:
            break
        before = now
    assert _request(servers, METERED).status_code == 200
    assert _request(servers, METERED).status_code == 200
    assert _request(servers, "m-unmetered").status_code == 404  # counted as model "unknown"
    deadline, after = time.monotonic() + 90, before  # Ray exports every few seconds
    while time.monotonic() < deadline:
        after = _scrape()
        if _value(after, "tryon_requests", model="unknown") > _value(before, "tryon_requests", model="unknown") \
                and _value(after, "tryon_request_seconds_count", model=METERED, stage="total") \
                >= _value(before, "tryon_request_seconds_count", model=METERED, stage="total") + 2:
            break
        time.sleep(2)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("tryon_requests", model=METERED, status="200") == 2, after
    assert delta("tryon_requests", model="unknown", status="404") == 1
    assert delta("tryon_errors", model="unknown", reason="model") == 1
    assert not any(("model", "m-unmetered") in labels for _, labels in after), "a client's string is no label"
    assert delta("tryon_request_seconds_count", model=METERED, stage="total") == 2
    assert delta("tryon_request_seconds_count", model=METERED, stage="model") == 2
    # the adapter counters agree with the replica's own count since it started (one replica)
    info = requests.get(f"{servers}/v1/models", timeout=60).json()
    deadline = time.monotonic() + 60
    while _value(after, "tryon_adapter_loads") != info["loads"] and time.monotonic() < deadline:
        time.sleep(2)
        after = _scrape()
    assert _value(after, "tryon_adapter_loads") == info["loads"] >= 1, (after, info)
    assert _value(after, "tryon_adapter_evictions") == info["evictions"]


def test_experiment_events_survive_a_redeploy_of_the_application(servers, registry, tmp_path):
    """Issue 28, acceptance 2 through Serve itself: an application with an experiment and an event
    log is deleted and deployed again (``serve.delete`` + ``serve.run``, new replicas); the report
    over the log is the same after as before, and a request to the new deployment is added to it."""
    import subprocess
    import sys
    from pathlib import Path

    from ray import serve

    from serve.app import application

    events = tmp_path / "events.sqlite"
    settings = {"torch_threads": 1, "max_batch_size": 1, "registry": str(registry), "max_adapters": 2,
                "experiments": [{"name": "bottoms-v2", "arms": {"m-a": 1.0, "m-b": 1.0}}], "events": str(events)}
    small = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 4}
    url = f"{servers}/ab"

    def report() -> dict:
        done = subprocess.run([sys.executable, "-m", "serve.ab_report", "--events", str(events), "--json"],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    serve.run(application(settings, model_options=small), name="ab", route_prefix="/ab")
    arms = {}
    for n in range(6):
        r = _request(url, headers={"x-tryon-user": f"user-{n}"})
        assert r.status_code == 200 and r.headers["x-tryon-experiment"] == "bottoms-v2", r.text
        arms[f"user-{n}"] = r.headers["x-tryon-model"]
    a = _request(url, "m-a", headers={"x-tryon-experiment": "bottoms-v2"}).headers["x-request-id"]
    b = _request(url, "m-b", headers={"x-tryon-experiment": "bottoms-v2"}).headers["x-request-id"]
    assert requests.post(f"{url}/v1/feedback", json={"request_id": a, "other_request_id": b,
                                                     "preferred_request_id": b}, timeout=60).status_code == 200
    before = report()
    assert sum(arm["requests"] for arm in before["arms"].values()) == 8 and before["pairs"][0]["comparisons"] == 1
    serve.delete("ab")
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 404, "the application is gone"
    serve.run(application(settings, model_options=small), name="ab", route_prefix="/ab")
    assert report() == before, "the events survived the redeploy"
    r = _request(url, headers={"x-tryon-user": "user-0"})
    assert r.headers["x-tryon-model"] == arms["user-0"], "the same arm after the redeploy"
    assert report()["arms"][arms["user-0"]]["requests"] == before["arms"][arms["user-0"]]["requests"] + 1
    serve.delete("ab")

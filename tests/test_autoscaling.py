"""Autoscaling of the model deployment, exercised: loopback load starts a second model replica,
and the replica goes away once the load stops.

The app is serve/app.py's, on 127.0.0.1 and a free port, with the tiny base and an autoscaling
config of small delays (the file's are 10 s up and 120 s down; the mechanism is the same). Load
is bounded in count and time: 4 clients post try-ons until Serve reports two running model
replicas (polled with ``serve.status()``), then stop; the replica count must then fall back to
one. Every request of the load must have been answered 200.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from serve_helpers import free_port, png

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a Serve app of its own and minutes of load (~2 min);
# the served autoscaling config as built from the yaml: tests/test_serve_config.py

APP = "autoscale"
CLIENTS = 4
MAX_REQUESTS = 600
LOAD_DEADLINE_S = 150
SCALE_DOWN_DEADLINE_S = 90
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2,
    "target_ongoing_requests": 1,   # 4 clients want 4 replicas: capped at 2
    "upscale_delay_s": 1, "downscale_delay_s": 3,
    # how often replicas and handles report their queues (deprecated field, still read by Ray 2.60:
    # the default of 10 s would make each step of the test wait ~20 s)
    "metrics_interval_s": 0.5, "look_back_period_s": 2,
}


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    deployment = app.deployments.get("TryOnModel") if app else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


@pytest.fixture(scope="module")
def server(ray_session):
    from ray import serve

    from serve.app import application

    port = free_port()
    serve.shutdown()  # a Serve left by another module keeps its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"overrides": ["model.transformer_override=null"], "torch_threads": 1, "max_batch_size": 2}
    # num_cpus 0: the session's 2 logical CPUs may be held by other modules' actors
    app = application(settings, model_options={"autoscaling_config": AUTOSCALING, "max_ongoing_requests": 4,
                                               "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 0}})
    serve.run(app, name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP)
    serve.shutdown()


def test_load_starts_a_second_model_replica_and_it_goes_away_after(server):
    assert running_replicas() == 1, "min_replicas at rest"
    rng = np.random.default_rng(0)
    person = png(rng.integers(0, 255, (128, 96, 3), dtype=np.uint8))
    mask = np.zeros((128, 96), np.uint8)
    mask[64:120, 24:72] = 255
    files = {"person": ("p.png", person, "image/png"), "garment": ("g.png", person, "image/png"),
             "mask": ("m.png", png(mask), "image/png")}
    scaled_up, sent = threading.Event(), iter(range(MAX_REQUESTS))
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client() -> list[int]:
        codes = []
        while not scaled_up.is_set() and time.monotonic() < deadline and next(sent, None) is not None:
            r = requests.post(f"{server}/v1/tryon", files=files, data={"garment_type": "lower", "steps": "8"},
                              timeout=120)
            codes.append(r.status_code)
        return codes

    replicas = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        loads = [pool.submit(client) for _ in range(CLIENTS)]
        while not all(f.done() for f in loads):
            replicas.append(running_replicas())
            if replicas[-1] == 2:
                scaled_up.set()
            time.sleep(0.5)
        codes = [c for f in loads for c in f.result()]
    print(f"\nautoscaling: {len(codes)} requests until 2 replicas ran; replica counts seen {sorted(set(replicas))}")
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert max(replicas) == 2, f"no second replica within {LOAD_DEADLINE_S} s / {MAX_REQUESTS} requests"

    stop = time.monotonic() + SCALE_DOWN_DEADLINE_S
    while running_replicas() > 1 and time.monotonic() < stop:
        time.sleep(0.5)
    assert running_replicas() == 1, f"the second replica still ran {SCALE_DOWN_DEADLINE_S} s after the load"
    after = requests.post(f"{server}/v1/tryon", files=files, data={"garment_type": "lower", "steps": "2"}, timeout=120)
    assert after.status_code == 200, "the remaining replica serves"

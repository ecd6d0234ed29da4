"""Many LoRAs on one base (issue 28, item 1): what serving three models from one replica costs.

    python bench/serve_models.py                       # 40 paired requests, 500 in the load test
    python bench/serve_models.py --requests 10 --load 48 --steps 2   # a quick look

Three releases (random LoRAs on the preset's tiny base and alpha, in the sweep's ``release/`` layout) in a registry
folder, and three Serve applications side by side on one Ray (each one model replica, 1 torch thread):

- ``/single``: one LoRA (``args.lora``), the server issue 28 replaces;
- ``/multi``: the registry, ``max_adapters: 3`` (every model stays loaded on the one base);
- ``/swap``: the registry, ``max_adapters: 1`` (each change of model loads its adapter anew).

1. Latency one request at a time, measured in rotation (single m-a; multi m-a; multi m-a/m-b/m-c in
   turn; swap m-a/m-b/m-c in turn, so every request loads an adapter; swap m-a again and again): the
   p50 of each. **multi / single** is what one base with three models costs a request;
   **swap cost** is the p50 of the swapping requests minus that of the same app's loaded ones.
2. A load test: ``--load`` requests over the three models (in turn) at concurrency 16 on ``/multi``:
   the count of each status (the bar: no 5xx), p50/p95 latency and requests per second.

The load average is printed before and after: the figures only mean something on a quiet machine.
The figures and the command go to docs/PERFORMANCE.md (## Serving). No test asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.serve_overhead import example, load_average, png, start_serve  # noqa: E402

MODELS = ("m-a", "m-b", "m-c")


def write_registry(root: Path, cfg) -> Path:
    """Three releases drawn on ``cfg``'s resolved base and transformer: each LoRA weight is
    0.1 x noise of its own seed, saved as training saves it, with its training config and metrics."""
    import torch

    from catvton import artifacts
    from catvton.train.checkpoint import save_weights
    from catvton.train.engine import build_transformer

    for k, name in enumerate(MODELS):
        model = build_transformer(cfg, torch.device("cpu"), torch.float32)
        noise = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=noise, dtype=p.dtype) * 0.1)
        save_weights(model, root / name, cfg)
        (root / name / artifacts.TRAINING_CONFIG).write_text(json.dumps(cfg.to_dict()))
        (root / name / artifacts.METRICS).write_text(json.dumps({"val_loss": 0.5 + k / 10}))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="requests per latency measurement (each of 5)")
    ap.add_argument("--load", type=int, default=500, help="requests in the load test")
    ap.add_argument("--concurrency", type=int, default=16, help="client threads in the load test")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import ray
    import torch
    from ray import serve

    from catvton.config import load_config
    from catvton.offline import resolve
    from serve.app import application

    torch.set_num_threads(1)
    cfg = resolve(load_config(ROOT / "configs/tiny.yaml"))  # the preset: tiny base + alpha, as a registry serves
    registry = write_registry(Path(tempfile.mkdtemp(prefix="serve-models-")), cfg)
    H, W = cfg.canvas.half_height, cfg.canvas.half_width
    person, garment, mask = example(H, W)
    files = {"person": png(person), "garment": png(garment), "mask": png(mask.astype(np.uint8) * 255)}
    common = {"torch_threads": 1, "max_batch_size": 4}
    # three model replicas on Ray's 2 CPUs: each asks for none (each runs 1 torch thread); measured in
    # rotation, one request at a time, they do not compete except in the load test (/multi alone)
    options = {"max_ongoing_requests": 8, "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 0}}

    def once(app: str, model: str | None, seed: int, must_serve: bool = False) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = requests.post(f"{base}/{app}/v1/tryon", timeout=600,
                          headers={"x-tryon-model": model} if model else {},
                          data={"garment_type": "lower", "seed": str(seed), "steps": str(args.steps)},
                          files={k: (f"{k}.png", v, "image/png") for k, v in files.items()})
        if must_serve and r.status_code != 200:
            raise SystemExit(f"/{app} with model {model}: {r.status_code} {r.text[:500]}")
        return r.status_code, time.perf_counter() - t0

    base = start_serve()
    serve.run(application({**common, "lora": [str(registry / "m-a")]}, model_options=options),
              name="single", route_prefix="/single")
    for name, keep in (("multi", 3), ("swap", 1)):
        serve.run(application({**common, "registry": str(registry), "max_adapters": keep}, model_options=options),
                  name=name, route_prefix=f"/{name}")
    series = {"single m-a": ("single", lambda i: None), "multi m-a": ("multi", lambda i: "m-a"),
              "multi rotating": ("multi", lambda i: MODELS[i % 3]),
              "swap rotating (a load each)": ("swap", lambda i: MODELS[i % 3]),
              "swap m-a (loaded)": ("swap", lambda i: "m-a")}
    print("three applications up; warming up", file=sys.stderr, flush=True)
    try:
        for app, pick in series.values():  # warm-up: every app, every model it will be asked for
            for i in range(3):
                once(app, pick(i), 0, must_serve=True)
        loads = [load_average()]
        print("one at a time, in rotation ...", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {k: [] for k in series}
        for i in range(args.requests):
            for label, (app, pick) in series.items():
                _, seconds = once(app, pick(i), i, must_serve=True)
                times[label].append(seconds)
        loads.append(load_average())

        def load_one(i: int) -> tuple[int, float]:
            return once("multi", MODELS[i % 3], i)

        print(f"load test: {args.load} requests at concurrency {args.concurrency} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(load_one, range(args.load)))
        wall = time.perf_counter() - t0
        loads.append(load_average())
        models = requests.get(f"{base}/multi/v1/models", timeout=60).json()
    finally:
        serve.shutdown()
        ray.shutdown()

    p50 = {k: statistics.median(v) for k, v in times.items()}
    statuses = Counter(s for s, _ in results)
    ok = sorted(t for s, t in results if s == 200)
    print(f"\ntiny base + alpha + 3 random LoRAs, {H}x{W} per half, {args.steps} steps, 1 torch thread, max_batch_size 4")
    print("| measurement | value |")
    print("|---|---:|")
    for label, v in p50.items():
        print(f"| p50, one at a time ({args.requests}): {label} | {v * 1000:.0f} ms |")
    print(f"| **multi (3 models loaded) / single, m-a** | **{p50['multi m-a'] / p50['single m-a']:.2f}x** |")
    print(f"| **multi rotating over 3 / single** | **{p50['multi rotating'] / p50['single m-a']:.2f}x** |")
    swap = p50["swap rotating (a load each)"] - p50["swap m-a (loaded)"]
    print(f"| **adapter swap cost** (p50 swapping - p50 loaded, max_adapters 1) | **{swap * 1000:+.0f} ms** |")
    print(f"| load test: {args.load} requests over 3 models, concurrency {args.concurrency} | "
          f"statuses {dict(sorted(statuses.items()))}; 5xx: {sum(n for s, n in statuses.items() if s >= 500)} |")
    if ok:
        print(f"| load test latency p50 / p95 | {statistics.median(ok) * 1000:.0f} / "
              f"{ok[int(0.95 * (len(ok) - 1))] * 1000:.0f} ms; {args.load / wall:.2f} req/s |")
    print(f"| /multi's adapters loaded at the end | {models.get('loaded')} |")
    print(f"\nload average: before {loads[0]}; after the one-at-a-time rotation {loads[1]}; after the load test {loads[2]}")
    if any(s >= 500 for s in statuses):
        raise SystemExit(f"the load test got 5xx answers: {dict(statuses)}")


if __name__ == "__main__":
    main()

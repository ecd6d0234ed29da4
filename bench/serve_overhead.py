"""Serving benchmarks: HTTP overhead over a direct pipeline call, and throughput with vs without batching.

    python bench/serve_overhead.py                  # tiny base, 4 steps, results on stdout
    python bench/serve_overhead.py --lora outputs/tiny-lora/lora --requests 80

1. Direct: the library calls of one request in this process, from the uploaded bytes to the
   answer's bytes (read_photo/read_mask, prepare, generate, paste back, PNG), one at a time; HTTP:
   the same request through Ray Serve (proxy -> ingress -> model -> back), one at a time,
   alternating with the direct calls. Both use one torch thread. Difference and ratio of the
   medians; the ingress's Server-Timing spans say where the HTTP request's time went.
2. Throughput at concurrency 8 through two Serve applications, ``max_batch_size`` 4 and 1 (one model
   replica each), in alternating bursts; ratio of the median bursts.

The load average is printed before and after: the figures only mean something on a quiet machine.
The figures and the command go to docs/PERFORMANCE.md (## Serving). No test asserts a timing.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def example(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    person = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[h // 2: h - h // 10, w // 4: 3 * w // 4] = True
    garment = np.full((60, 40, 3), (200, 40, 40), np.uint8)
    return person, garment, mask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve() -> str:
    """Ray (2 CPUs, a temp dir of its own: several Ray instances share this machine, /tmp/ray is
    anyone's) and Serve on 127.0.0.1 and a free port; the base URL."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rsb", dir="/tmp"),
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: decode;dur=12.5, model;dur=80.1`` -> seconds by name."""
    spans = (part.strip().split(";dur=") for part in header.split(","))
    return {name: float(ms) / 1000 for name, ms in spans}


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} CPUs)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", default="", help="LoRA folder (default: the base alone)")
    ap.add_argument("--requests", type=int, default=40, help="requests per measurement")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import ray
    import torch
    from ray import serve

    from catvton.infer.request import encode_image, paste_generated, read_mask, read_photo
    from catvton.infer.serving import TryOnService, serve_config_from_dict
    from catvton.offline import resolve
    from serve.app import application

    torch.set_num_threads(1)
    # a LoRA is served with its own training_config.json (base + the alpha it was trained on);
    # without one, the tiny base alone (no alpha to build)
    settings = {"config": "configs/tiny.yaml", "lora": [args.lora] if args.lora else [],
                "overrides": [] if args.lora else ["model.transformer_override=null"],
                "torch_threads": 1, "max_batch_size": 4}
    service = TryOnService.load(serve_config_from_dict(settings), prepare=resolve)
    c = service.cfg.canvas
    H, W = c.half_height, c.half_width
    person, garment, mask = example(H, W)
    n = args.requests
    files = {"person": png(person), "garment": png(garment), "mask": png(mask.astype(np.uint8) * 255)}
    limits = service.settings.limits

    direct_model: list[float] = []

    def direct_once(seed: int) -> None:
        """What the ingress and the model replica do for one request, without Serve."""
        p = read_photo(files["person"], "person", limits, (H, W), c.person_fit)
        g = read_photo(files["garment"], "garment", limits, (H, W), "pad")
        m = read_mask(files["mask"], "mask", limits, p)
        job = service.prepare(p.work, g.work, m, "lower", seed, args.steps, None, None)
        t0 = time.perf_counter()
        canvas = service.generate([job])[0]
        direct_model.append(time.perf_counter() - t0)
        r = service.reply(job, canvas)
        encode_image(paste_generated(p.full, r["half"], r["general"], r["fit"]), p.format, p.icc_profile)

    spans: list[dict[str, float]] = []

    def http_once(url: str, seed: int) -> float:
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/tryon", timeout=300, data={"garment_type": "lower", "seed": str(seed),
                                                                 "steps": str(args.steps)},
                          files={k: (f"{k}.png", v, "image/png") for k, v in files.items()})
        assert r.status_code == 200, r.text
        seconds = time.perf_counter() - t0
        spans.append({**server_timing(r.headers["Server-Timing"]), "client": seconds})
        return seconds

    def timed(fn, *a) -> float:
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    def burst(url: str) -> float:
        """Requests per second of ``n`` requests from 8 threads."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: http_once(url, i), range(n)))
        return n / (time.perf_counter() - t0)

    base = start_serve()
    # Two applications side by side (batch 4 at /b4, batch 1 at /b1), and the direct calls, measured
    # in alternation: on a shared, noisy machine, drift then hits both sides of each ratio alike.
    for batch in (4, 1):
        serve.run(application({**settings, "max_batch_size": batch},
                              model_options={"max_ongoing_requests": 8, "max_queued_requests": 64}),
                  name=f"b{batch}", route_prefix=f"/b{batch}")
    try:
        direct_once(0), http_once(f"{base}/b4", 0), http_once(f"{base}/b1", 0)  # warm-up
        loads = [load_average()]
        direct_t, http_t = [], []
        spans.clear(), direct_model.clear()
        for i in range(n):
            direct_t.append(timed(direct_once, i))
            http_t.append(http_once(f"{base}/b4", i))
        one_at_a_time = list(spans)
        loads.append(load_average())
        rps: dict[int, list[float]] = {4: [], 1: []}
        for _ in range(3):
            for batch in (4, 1):
                rps[batch].append(burst(f"{base}/b{batch}"))
        loads.append(load_average())
        sizes = {b: requests.get(f"{base}/b{b}/v1/info", timeout=60).json()["recent_batch_sizes"] for b in (4, 1)}
    finally:
        serve.shutdown()
        ray.shutdown()
    direct, http = statistics.median(direct_t), statistics.median(http_t)
    out = {"http": http, "rps_batch4": statistics.median(rps[4]), "rps_batch1": statistics.median(rps[1])}
    where = {k: statistics.median(s[k] for s in one_at_a_time) for k in one_at_a_time[0]}

    print(f"\ntiny base{' + alpha + LoRA ' + args.lora if args.lora else ''}, {H}x{W} per half, {args.steps} steps, 1 torch thread")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| direct call (decode, prepare, generate, paste back, PNG), median of {n} | {direct * 1000:.0f} ms |")
    print(f"| HTTP through Serve, one at a time, median of {n} | {out['http'] * 1000:.0f} ms |")
    print(f"| **HTTP - direct** | **+{(out['http'] - direct) * 1000:.0f} ms** ({out['http'] / direct:.2f}x) |")
    print("| HTTP medians by the ingress's Server-Timing: " + ", ".join(
        f"{k} {v * 1000:.0f}" for k, v in where.items()) + " ms | |")
    # the model's own time differs between the two processes on a loaded machine: this pair
    # compares what each path spends outside the pipeline call
    outside_direct = statistics.median(t - m for t, m in zip(direct_t, direct_model))
    outside_http = statistics.median(s["client"] - s["model"] for s in one_at_a_time)
    print(f"| outside the pipeline call, median: direct / HTTP | {outside_direct * 1000:.0f} ms / "
          f"{outside_http * 1000:.0f} ms (+{(outside_http - outside_direct) * 1000:.0f} ms) |")
    print(f"| throughput at concurrency 8, max_batch_size 4 (median of 3 bursts of {n}) | {out['rps_batch4']:.2f} req/s |")
    print(f"| throughput at concurrency 8, max_batch_size 1 (median of 3 bursts of {n}) | {out['rps_batch1']:.2f} req/s |")
    print(f"| **batching 4 / 1** | **{out['rps_batch4'] / out['rps_batch1']:.2f}x** |")
    print(f"| batch sizes run (size: count), max_batch_size 4 / 1 | {sizes[4]} / {sizes[1]} |")
    print(f"\nload average: before {loads[0]}; after the one-at-a-time pairs {loads[1]}; after the bursts {loads[2]}")


if __name__ == "__main__":
    main()

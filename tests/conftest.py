"""Shared fixtures: image-cell builders, one Ray instance for the whole session, and an
environment that does not depend on the machine or the shell the tests run from.

- ``CATVTON_CACHE``: the cache of built-once folders (tiny base, alpha, synthetic set, latent
  caches). ``pytest --fresh-cache`` (or ``CATVTON_FRESH_CACHE=1``) points it at a new empty folder
  for the whole run, shared by every test, subprocess and Ray worker of that run, so nothing a
  previous run left can make a test pass.
- ``TRYON_API_KEY`` is removed from the environment at start-up: the serving tests set the key
  they test; a key exported in the user's shell would otherwise override their configs.
- ``PYTHONPATH`` starts with the repository root, set here before any Ray starts: every Ray of the
  run (the ``ray_session`` fixture's, or one an entry point starts in this process) inherits it, so
  workers and Serve replicas import ``serve/``, ``ray_jobs/`` and the test helpers whatever
  directory pytest was started from (``cd tests && pytest`` left Serve replicas without ``serve``).
- torch uses ``TORCH_THREADS`` threads in every test (a session fixture), not whatever the files
  that happened to be collected set at import: the thread count changes weights.

Order options, to find tests that depend on the order they run in: ``--shuffle SEED`` (modules in
a seeded random order, then the tests within each module; the seed is in the header) and
``--reverse-files`` (files in reverse order, each file's tests in their own order).
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Data 2.60 reads parquet footers with a pool of up to 32 actors, each a worker process of its
# own (seconds of a CPU each to start on 2 cores) for caches of a few small files: one is enough
# here, and what a read returns does not depend on it (3.1 s vs 6.1 s a cached split, 2026-12-08)
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.pop("TRYON_API_KEY", None)  # before any Ray or Serve process inherits it
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # before any Ray starts
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

TORCH_THREADS = 1
"""torch's intra-op threads in every test: the tests compare results bit for bit (against
diffusers' pipelines, across processes, against shipped models' recorded figures) and share
2 CPUs with Ray's workers."""


def pytest_addoption(parser):
    parser.addoption("--fresh-cache", action="store_true", default=False,
                     help="build every cached folder (tiny base, alpha, synthetic set, latent caches) anew "
                          "into an empty CATVTON_CACHE for this run (also: CATVTON_FRESH_CACHE=1)")
    parser.addoption("--shuffle", type=int, default=None, metavar="SEED",
                     help="run the modules in a random order seeded by SEED, and each module's tests in a "
                          "random order too (finds tests that depend on what ran before them)")
    parser.addoption("--reverse-files", action="store_true", default=False,
                     help="run the test files in reverse order (each file's tests in their own order)")


def pytest_configure(config):
    if config.getoption("--fresh-cache") or os.environ.get("CATVTON_FRESH_CACHE") == "1":
        import tempfile

        os.environ["CATVTON_CACHE"] = tempfile.mkdtemp(prefix="catvton-test-cache-")


def pytest_report_header(config):
    seed = config.getoption("--shuffle")
    order = [f"shuffled with seed {seed} (--shuffle {seed})"] if seed is not None else []
    order += ["files reversed (--reverse-files)"] if config.getoption("--reverse-files") else []
    return [f"test order: {', '.join(order)}"] if order else []


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    seed, reverse = config.getoption("--shuffle"), config.getoption("--reverse-files")
    if seed is None and not reverse:
        return
    modules: dict[str, list] = {}  # file -> its tests, in collection order (dicts keep insertion order)
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    files = list(modules)
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(files)
        for f in files:
            rng.shuffle(modules[f])
    if reverse:
        files.reverse()
    items[:] = [item for f in files for item in modules[f]]


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """``TORCH_THREADS`` for the whole run, set once before the first test."""
    import torch

    torch.set_num_threads(TORCH_THREADS)


def tiny_config(*overrides: str, models: bool = True):
    """``configs/tiny.yaml`` + overrides, resolved as the entry points resolve it: the synthetic set,
    the tiny base (and the alpha when the config still names it) built once into the cache."""
    from catvton.config import load_config
    from catvton.offline import resolve

    return resolve(load_config(ROOT / "configs" / "tiny.yaml", list(overrides)), log=lambda _: None, models=models)


SMALL_DATA = ["data.synthetic_pids=40", "data.val_fraction=0.2", "data.test_fraction=0.2",
              "model.transformer_override=null"]  # pinned: the preset may change
"""The small synthetic data set of the pipeline tests (the cache does not depend on the transformer)."""


@pytest.fixture(scope="session")
def small_latent_cache(tmp_path_factory, ray_session) -> tuple[Path, Path]:
    """``(cache folder, root)``: :data:`SMALL_DATA`'s latent cache, built once a run through Ray
    Data into a temporary root. tests/test_preprocess.py checks the build itself; modules that
    only read a cache (tests/test_train.py) take the same one instead of building their own."""
    from catvton.cache.build import build_latent_cache

    root = tmp_path_factory.mktemp("latents")
    return build_latent_cache(tiny_config(*SMALL_DATA), cache_root=root, progress=False), root


def random_lora(cfg, folder: Path, seed: int = 0, scale: float = 0.1) -> Path:
    """A LoRA in the training format (``train.checkpoint.save_weights``) whose every trainable
    weight got ``scale`` x noise, so its output clearly differs from the base's."""
    import torch

    from catvton.train.checkpoint import save_weights
    from catvton.train.engine import build_transformer

    model = build_transformer(cfg, torch.device("cpu"), torch.float32)  # seeds torch itself (train.seed)
    noise = torch.Generator().manual_seed(seed)  # so ``seed`` decides the LoRA: two seeds, two LoRAs
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=noise, dtype=p.dtype) * scale)
    save_weights(model, Path(folder), cfg)
    return Path(folder)


def tiny_fill_case(folder: Path, n: int, steps: int):
    """``(cfg, lora, canvas (n,32,64,3), mask (n,32,64))``: the tiny base alone (built once) at 32x32
    halves with ``steps`` steps, a random rank-4 LoRA in ``folder``, seeded canvases and a mask box
    inside the person half."""
    from catvton.config import load_config
    from catvton.offline.tiny_base import ensure_tiny_base

    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.transformer_override=null", "canvas.half_width=32",
                                                   "canvas.half_height=32", f"infer.steps={steps}", "lora.rank=4",
                                                   "lora.alpha=8.0"])
    cfg.model.base = str(ensure_tiny_base())
    lora = random_lora(cfg, folder)
    rng = np.random.default_rng(0)
    canvas = (rng.integers(0, 256, (n, 32, 64, 3)) / 255.0).astype(np.float32)
    mask = np.zeros((n, 32, 64), np.float32)
    mask[:, 8:28, 36:60] = 1  # inside the person half
    return cfg, lora, canvas, mask


def wait_for_a_caller_blocked_on(final: Path, timeout: float = 60.0) -> None:
    """Return once a caller (a thread or a process) is blocked waiting for the lock of
    ``catvton.artifacts.build_once(final, ...)`` (``<final>.lock``): a ``->`` line on that file's
    inode in /proc/locks. A lock test calls it from inside the first builder's build, so the
    overlap it tests has really happened, however loaded the machine; no waiter within
    ``timeout`` seconds (the lock is not taken, or not waited for) fails loudly."""
    import time

    st = os.stat(final.parent / f"{final.name}.lock")
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any(" -> " in line and inode in line for line in f):
                return
        time.sleep(0.01)
    raise AssertionError(f"no second caller blocked on {final}.lock within {timeout:.0f} s: "
                         "build_once did not make it wait for this build")


def png_cell(arr: np.ndarray, mode: str | None = None) -> dict:
    """A parquet image cell ({bytes, path}) holding ``arr`` as PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch as Ray Data hands it to a stage."""
    out = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def person_and_mask(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 2: size - 4, size // 4: 3 * size // 4] = 255
    return photo, mask


def make_row(pid="id_00000001", pose="01_1_front", cloth_type="Pants", size=64, seed=0, **over) -> dict:
    photo, mask = person_and_mask(size, seed)
    row = {"images": png_cell(photo), "gender": "WOMEN", "pose": pose, "cloth_type": cloth_type,
           "pid": pid, "caption": "a woman in blue pants and a white tee", "mask": png_cell(mask),
           "mask_overlay": png_cell(photo)}
    row.update(over)
    return row


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (init costs seconds), started the way every entry
    point starts it (:func:`catvton.ray_utils.init_ray`); a Ray already up in this process (an entry
    point a test ran in-process started it) is used as it is. Workers find the repository root
    through the ``PYTHONPATH`` set above."""
    import ray

    from catvton.ray_utils import init_ray

    init_ray(num_cpus=2, dashboard=False, log=lambda _: None)
    node = ray._private.worker._global_node
    temp = Path(node.get_temp_dir_path()) if node is not None else None
    yield ray
    ray.shutdown()
    # init_ray keeps a local Ray's temp dir (its logs, which it names to the user); a test run's is
    # of no use afterwards, and one was left in /tmp by every run
    if temp is not None and temp.name.startswith("rct") and temp.parent == Path("/tmp"):
        shutil.rmtree(temp, ignore_errors=True)


RAY_NOISE = ["Failed to query Ray Train Controller", "TrainingReport(", "Reporting training result",
             "Running Dataset", "(raylet)", "low on memory", "(RayTrainWorker", "(TrainController"]
"""Ray's per-report, per-epoch and memory-monitor output, and worker lines forwarded to the
driver: none of it belongs on a training job's console."""


def job_env() -> dict[str, str]:
    """The environment of an entry point a test runs as a user does: a local Ray of its own."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a local job, whatever the shell that runs pytest points at
    return env


def remove_ray_temps(console: str) -> None:
    """The temp dirs of the local Rays a finished job named (``Ray's logs: /tmp/rct.../session_.../logs``)."""
    import re

    for temp in re.findall(r"Ray's logs: (/tmp/rct[^/\s]+)/", console):
        shutil.rmtree(temp, ignore_errors=True)


def run_console_job(argv: list[str], timeout: float = 1500) -> tuple[int, str]:
    """Run an entry point in a subprocess; its exit code and console (stdout + stderr), its local
    Ray's temp dir removed once it ended."""
    import subprocess

    # bytes, decoded here: text mode would turn each "\r" of a redrawn bar into a line of its own
    done = subprocess.run(argv, cwd=ROOT, env=job_env(), capture_output=True, timeout=timeout)
    console = (done.stdout + done.stderr).decode(errors="replace")
    remove_ray_temps(console)
    return done.returncode, console


def check_console(console: str, run_name: str, steps: int, run_dir: Path) -> None:
    """What a training job's console and run folder must show: few lines, none of Ray's chatter, a
    plain progress line ending at ``steps``/``steps``, and Ray's own output copied into the run's
    ``ray_logs`` with the workers' per-report lines and no placement-group cleaner warning."""
    # lines as a terminal (and `wc -l`) counts them: a bar redrawn with "\r" is one line
    lines = console.split("\n")
    assert len(lines) < 150, console[-6000:]
    for noise in RAY_NOISE:
        assert noise not in console, (noise, console[-4000:])
    # not a terminal: a plain progress line at each tenth of the run, the last one at the end
    progress = [line for line in lines if line.startswith(f"{run_name} ") and " steps " in line]
    assert progress and progress[-1].startswith(f"{run_name} {steps}/{steps} steps 100% · loss "), lines
    assert " s/step · ETA " in progress[-1] and " lr " in progress[-1], progress[-1]
    assert "Ray: local instance, dashboard http://127.0.0.1:" in console
    (session,) = (run_dir / "ray_logs").iterdir()  # a copy of this job's Ray session logs, not a link
    assert session.name.startswith("session_") and session.is_dir() and not session.is_symlink()
    assert f"Ray's logs of this run (workers, Ray Train, Ray Data): {session}" in console
    workers = list(session.glob("worker-*.out")) + list(session.glob("worker-*.err"))
    assert workers, sorted(p.name for p in session.iterdir())
    reports = [p for p in workers if "Reporting training result" in p.read_text(errors="replace")]
    assert reports, "Ray Train's per-report lines are in the workers' logs"
    # the placement-group cleaner finds its controller: the warning is gone, not only moved
    cleaner = [p.name for p in session.rglob("*") if p.is_file()
               and "Failed to query Ray Train Controller" in p.read_text(errors="replace")]
    assert cleaner == [], cleaner

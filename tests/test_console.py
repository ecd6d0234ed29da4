"""What a user sees on the console, and whose Ray a local job runs on.

``make demo`` once printed 2,298 lines: Ray Train's placement-group cleaner warning every few
seconds ("Failed to query Ray Train Controller actor state"), a ``Reporting training result ...
TrainingReport(...)`` line per report, Ray Data's progress bars per epoch. Now a training job
prints one progress line (step/total, loss, lr, s/step, ETA) and a few lines of its own; Ray's
output is in the run's folder (``<run dir>/ray_logs``).

A local Ray belongs to the process that starts it (``catvton.ray_utils.init_ray``): a training job
and ``serve run`` started at once once joined each other's Ray through a fixed temp dir.

Both tests run entry points in subprocesses, as a user does: the session's shared ``ray.init``
fixture would hide what ``init_ray`` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import check_console, job_env, remove_ray_temps, run_console_job

from catvton import artifacts

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["data.synthetic_pids=40", "data.val_fraction=0.2", "data.test_fraction=0.2", "train.max_steps=6",
         "train.val_every=3", "train.checkpoint_every=3", "train.val_batches=1", "train.warmup_steps=2"]
"""The data of tests/test_default_job.py (its alpha and latent cache), six steps."""


def test_the_progress_line_says_what_is_known_so_far():
    from catvton.train.progress import progress_text

    assert progress_text({"step": 0, "total": 3000}) == "ETA ?"  # before the first report
    assert progress_text({"step": 2400, "total": 3000, "loss": 0.61234, "lr": 7.2e-4, "sec_per_step": 0.13}) == \
        "loss 0.6123 · lr 7.20e-04 · 0.130 s/step · ETA 1:18"
    assert progress_text({"step": 3000, "total": 3000}).endswith("ETA 0:00")  # a finished run, resumed
    assert progress_text({"step": 0, "total": 10**6, "sec_per_step": 0.5}) == "0.500 s/step · ETA 138:53:20"


# ~70 s; the default tier checks the same console and ray_logs through easy_train.py's proof run
# (tests/test_easy_train.py, a subprocess too: init_ray and run_job(progress=True) are shared)
@pytest.mark.slow
@pytest.mark.ray
def test_the_training_job_prints_a_progress_line_and_keeps_rays_output_in_the_run_folder(tmp_path):
    sets = [*SMALL, f"run.output_dir={tmp_path / 'out'}", f"run.storage_path={tmp_path / 'ray'}",
            "run.wandb_mode=disabled", "run.name=console"]
    argv = [sys.executable, "ray_jobs/train.py"]
    for s in sets:
        argv += ["--set", s]
    code, console = run_console_job(argv)
    assert code == 0, console[-4000:]
    run_dir = tmp_path / "out" / "console"
    check_console(console, "console", 6, run_dir)
    assert json.loads((run_dir / artifacts.FINAL_METRICS).read_text())["step"] == 6


CHILD = """
import json, sys, time
from pathlib import Path
import ray
from catvton.ray_utils import init_ray

init_ray(num_cpus=1)
node = ray._private.worker._global_node
Path(sys.argv[1]).write_text(json.dumps({
    "gcs": ray.get_runtime_context().gcs_address,
    "session": node.get_session_dir_path(),
    "cpus": ray.cluster_resources().get("CPU"),
    "nodes": len(ray.nodes()),
}))
go = Path(sys.argv[2])
while not go.exists():  # both Rays stay up until the test has read both
    time.sleep(0.2)
"""


@pytest.mark.ray
@pytest.mark.slow  # two Rays started side by side (~30-45 s); the default tier starts init_ray's local Ray
# in every Ray test and checks its console in easy_train's proof run (tests/test_easy_train.py)
def test_two_local_jobs_started_at_once_get_their_own_ray(tmp_path):
    env = job_env()
    infos, go = [tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(info), str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for info in infos]
    try:
        deadline = time.monotonic() + 300  # a bound on a hang, not a timing assertion
        while not all(i.exists() for i in infos) and all(p.poll() is None for p in procs) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(i.exists() for i in infos), [p.poll() for p in procs]
        a, b = (json.loads(i.read_text()) for i in infos)
    finally:
        go.touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        remove_ray_temps("".join(outputs))
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert a["gcs"] != b["gcs"] and a["session"] != b["session"], (a, b)
    for info, out in zip((a, b), outputs):
        assert info["cpus"] == 1 and info["nodes"] == 1, info  # its own one-CPU node, not the other's
        assert info["session"].startswith("/tmp/rct"), info  # a temp dir of its own, short for Ray's sockets
        # one line: the dashboard's URL (on 127.0.0.1) and where Ray's logs are
        (line,) = [line for line in out.splitlines() if line.startswith("Ray: ")]
        assert line.startswith("Ray: local instance, dashboard http://127.0.0.1:"), out
        assert line.endswith(f"Ray's logs: {info['session']}/logs"), (line, info)
    urls = [out.split("dashboard ", 1)[1].split(";", 1)[0] for out in outputs]
    assert urls[0] != urls[1], urls

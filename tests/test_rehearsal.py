"""The production job, rehearsed (issue 11): ``configs/l40s.yaml`` plus ``configs/rehearsal.yaml``
(which swaps only what this machine cannot have) through every entry point a user runs, against
a real Ray head (``ray start --head``) with ``ray job submit``, 2 training workers, and storage on
S3 (moto's S3 server on loopback, found the way users give theirs: ``AWS_ENDPOINT_URL``).

    python -m pytest -m rehearsal          # ~10 minutes on 2 CPUs

The override list itself is checked in the default tier: it must not silently grow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from catvton.artifacts import CHECKPOINTS_LOG

# hang guards, not timing checks: each job here may take its finish()'s 2400 s on 2 shared CPUs (the
# lost-worker fixture: up to 2400 s before its kill, then 2400 s to finish; the sweep took 651 s on a
# quiet machine); the default tier's 900 s per test cut them off mid-job
pytestmark = pytest.mark.timeout(5400)
from catvton.config.rehearsal import as_set_arguments, rehearsal_config, rehearsal_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "rehearsal"
RUN, SWEEP = "rehearsal-lora", "rehearsal-sweep"

SWAPPED = {
    "model": {"base", "transformer_override", "max_sequence_length"},  # no FLUX weights here
    "data": {"source", "synthetic_pids", "min_pairs_per_group"},  # no hub: synthetic rows
    "canvas": {"half_width", "half_height"},  # the tiny model's size
    "train": {"use_gpu", "num_workers", "cpus_per_worker",  # no GPU
              "max_steps", "warmup_steps", "val_every", "val_batches", "checkpoint_every"},  # step counts
    "infer": {"steps"},
    "tune": {"num_samples", "grace_period"},
}
"""Everything the rehearsal may override, by section. Adding a key is a reviewed change here."""


def test_the_rehearsal_overrides_only_what_this_machine_cannot_have():
    keys = [o.split("=", 1)[0] for o in rehearsal_overrides()]
    assert len(keys) == len(set(keys)), "no key twice"
    assert {tuple(k.split(".")) for k in keys} == {(s, f) for s, fields in SWAPPED.items() for f in fields}
    cfg = rehearsal_config()
    # what the rehearsal keeps from production: the LoRA, the batch, bf16, checkpointing, the search
    assert (cfg.lora.rank, cfg.lora.targets, cfg.train.batch_size, cfg.train.grad_accum) == (16, "attention+ff", 2, 4)
    assert (cfg.train.precision, cfg.train.gradient_checkpointing, cfg.data.groups) == ("bf16", True, ["lower", "full"])
    assert (cfg.tune.search, cfg.tune.ranks, cfg.tune.lr_min, cfg.tune.lr_max) == ("random", [16, 32, 64], 1e-5, 2e-4)
    assert cfg.train.num_workers >= 2 and not cfg.train.use_gpu


# --- the rehearsal itself (marker `rehearsal`) ------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str  # the dashboard's job API, what `ray job submit --address` takes
    gcs: str  # what RAY_ADDRESS takes for a driver on this machine
    env: dict[str, str]  # the environment the head and its jobs run with (S3 endpoint included)
    out: Path  # run.output_dir of every job (absolute: a job's working dir is a temporary copy)
    log: Path


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 server on a loopback port with an empty bucket; the variables a user would set,
    also set in this process while the module runs (it lists and reads the bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "rehearsal",
           "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal").create_bucket(Bucket=BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    server.stop()


@pytest.fixture(scope="module")
def head(s3_env, tmp_path_factory):
    """``ray start --head --block`` with 2 CPUs and the dashboard (the job server), in its own
    process group so that stopping it stops only this head (``ray stop`` would stop every Ray on
    the machine)."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    temp_dir = tempfile.mkdtemp(prefix="rrh", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, **s3_env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp / "head.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
    yield Head(address, f"127.0.0.1:{gcs}", env, tmp / "outputs", log)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def job_sets(head: Head, *extra: str) -> list[str]:
    return ["--config", "configs/l40s.yaml", *as_set_arguments(rehearsal_overrides() + [
        f"run.storage_path=s3://{BUCKET}/ray", f"run.output_dir={head.out}", "run.wandb_mode=disabled", *extra])]


class Submitted(subprocess.Popen):
    """A ``ray job submit`` client process and the id of the job it submitted."""
    head: Head
    job_id: str


def submit(head: Head, *args: str) -> Submitted:
    """``ray job submit --working-dir . -- python <args>``, as the README documents it; the S3
    endpoint travels in the job's runtime env, the way a user passes theirs."""
    runtime_env = {"env_vars": {k: head.env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                          "CATVTON_CACHE") if k in head.env}}
    job_id = f"rehearsal-{Path(args[0]).stem}-{time.monotonic_ns()}"
    proc = Submitted(
        [str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(ROOT),
         "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--", "python", *args],
        cwd=ROOT, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.head, proc.job_id = head, job_id
    return proc


def finish(proc: Submitted, timeout: float = 2400) -> str:
    """The job's output once it has ended with exit code 0. A job that has not ended (this wait
    timed out, or the test was interrupted) is stopped on the head: left running, it took the
    CPUs of the jobs the next tests submitted, and they timed out in turn."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            subprocess.run([str(BIN / "ray"), "job", "stop", "--address", proc.head.address, proc.job_id],
                           env=proc.head.env, capture_output=True, timeout=120)
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    return out


def s3_listing(prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos)


def s3_read(path: str) -> bytes:
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(f"s3://{path}")
    with fs.open_input_stream(path) as f:
        return f.read()


def kill_a_train_worker(head: Head) -> int:
    """SIGKILL one live Ray Train worker of this head (found through its State API): a worker
    lost mid-run, from outside, with nothing in the job's code."""
    from ray.util.state import list_actors

    workers = list_actors(address=head.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                         ("state", "=", "ALIVE")])
    assert len(workers) >= 2, workers
    pid = max(int(w.pid) for w in workers)
    os.kill(pid, signal.SIGKILL)
    return pid


def reported_checkpoints(run: Path) -> list[int]:
    """The steps of the checkpoints that the run itself has recorded as reported (rank 0's
    ``CHECKPOINTS_LOG``, :func:`catvton.train.loop.record_checkpoint`), whole lines only."""
    record = run / CHECKPOINTS_LOG
    whole = record.read_text().split("\n")[:-1] if record.is_file() else []  # the last: "" or being written
    return [int(line.rsplit(" ", 1)[1]) for line in whole if line.startswith("checkpoint reported at step ")]


@pytest.fixture(scope="module")
def trained(head, s3_env):
    """The training job on the rehearsal preset (checkpoints every 10 of 40 steps), a worker killed
    once the run has recorded three reported checkpoints: by then Ray Train has registered the
    first of them (see ``record_checkpoint``), so the restart must resume from one of them; a
    checkpoint object in the bucket alone was no proof (the restart began at step 0).
    Returns the job's output, the killed pid and the checkpoints recorded before the kill."""
    proc = submit(head, "ray_jobs/train.py", *job_sets(head, f"run.name={RUN}"))
    # a guard against a hang, not a timing check: at load 7-9 (other tests beside it, 2026-12-07) the
    # job had not recorded its third checkpoint 1200 s after submission, so no worker was killed
    deadline, killed, recorded = time.monotonic() + 2400, None, []
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            recorded = reported_checkpoints(head.out / RUN)
            if len(recorded) >= 3:
                killed = kill_a_train_worker(head)
            time.sleep(0.2)
    finally:
        out = finish(proc)
    return out, killed, recorded


@pytest.mark.rehearsal
def test_the_job_trains_on_s3_and_resumes_after_a_lost_worker(head, trained):
    from catvton import artifacts

    out, killed, recorded = trained
    assert killed, f"no worker was killed: the job ended before its third checkpoint ({recorded})\n{out[-3000:]}"
    run = head.out / RUN
    assert json.loads((run / artifacts.FINAL_METRICS).read_text())["step"] == 40
    resumes = (run / artifacts.RESUMES).read_text().splitlines()
    resumed = re.fullmatch(r"resumed from step (\d+)", resumes[0]) if len(resumes) == 1 else None
    assert resumed and int(resumed[1]) >= recorded[-3], (resumes, recorded)
    starts = [line for line in (run / CHECKPOINTS_LOG).read_text().splitlines() if line.startswith("started")]
    assert starts == ["started at step 0", f"started at step {resumed[1]}"], starts
    steps = [h["step"] for h in json.loads((run / artifacts.LOSS_HISTORY).read_text())]
    assert steps[0] == 0 and steps[-1] == 40 and steps == sorted(set(steps)), steps
    # checkpoints live in the bucket, and the exported LoRA is the last one's
    listing = s3_listing(f"ray/{RUN}")
    weights = sorted(p for p in listing if p.endswith(f"/{artifacts.LORA_WEIGHTS}") and "/checkpoint_" in p)
    assert weights, listing[:20]
    assert not any(Path(head.out).rglob("checkpoint_*")), "no checkpoint folder on local disk"
    assert (run / "lora" / artifacts.LORA_WEIGHTS).read_bytes() == s3_read(weights[-1])
    assert f"checkpoint:   s3://{BUCKET}/ray/{RUN}/checkpoint_" in out, out[-2000:]


@pytest.fixture(scope="module")
def swept(head, s3_env) -> str:
    """The production sweep's job (``ray_jobs/tune.py``), run once for the tests that need its
    release; its output."""
    return finish(submit(head, "ray_jobs/tune.py", *job_sets(head, f"tune.name={SWEEP}", "run.name=rehearsal-trial")))


@pytest.mark.rehearsal
def test_the_production_sweep_releases_a_winner(head, swept):
    from catvton import artifacts

    out = swept
    release = head.out / SWEEP / "release"
    assert (release / artifacts.LORA_WEIGHTS).is_file(), sorted(p.name for p in (head.out / SWEEP).iterdir())
    # the summary table the sweep prints once it is over: one row per trial of tune.num_samples
    table = out[out.index("== sweep finished =="):].splitlines()
    rows = [line.split(None, 5) for line in table if line.startswith("run_trial_")]
    # ASHA may stop the slower of the two random trials at its rung (grace_period 10 of 40 steps)
    assert len(rows) == 2 and {r[-1] for r in rows} <= {"completed", "stopped early"}, table[:8]
    assert any(r[-1] == "completed" and r[3] == "40" for r in rows), table[:8]
    winner = json.loads((release / artifacts.METRICS).read_text())
    assert (winner["trials"], winner["status"], winner["steps"]) == (2, "completed", 40), winner
    assert winner["completed"] + winner["stopped_early"] == 2, winner
    assert 1e-5 <= winner["lr"] <= 2e-4 and winner["rank"] in (16, 32, 64), winner  # l40s.yaml's tune: section
    best = min(float(r[4]) for r in rows if r[-1] == "completed")
    assert abs(winner["val_loss"] - best) < 1e-4  # the best completed trial (printed to 4 places)
    assert f"winner: lr {winner['lr']:.2e}, rank {winner['rank']}" in out
    assert any("/checkpoint_" in p for p in s3_listing(f"ray/{SWEEP}-trials")), "the trials' checkpoints are in the bucket"


@pytest.mark.rehearsal
def test_evaluate_and_publish_the_released_winner(head, swept):
    release = head.out / SWEEP / "release"
    assert release.is_dir(), f"the sweep did not release a winner:\n{swept[-3000:]}"
    finish(submit(head, "ray_jobs/evaluate.py", "--lora", str(release), "--max-per-group", "4"))
    report = json.loads((release / "eval" / "report.json").read_text())
    assert {"lower", "full"} <= set(report["groups"]), report["groups"].keys()
    done = subprocess.run([sys.executable, "ray_jobs/publish.py", "--lora", str(release), "--hub-model-id", "you/x",
                           "--dry-run"], cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    card = (release / "hub-upload" / "README.md").read_text()
    assert "lower" in card and "synthetic" in card


@pytest.mark.rehearsal
def test_the_roadmap_commands_on_the_production_preset(head):
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    for command in (["setup", "--out", str(head.out / "setup")],
                    ["test", "--steps", "6"],
                    ["full", "--epochs", "1", "--push-to-hub", "--hub-model-id", "you/x", "--hub-dry-run"]):
        sets = job_sets(head, "run.name=rehearsal-easy")
        if command[0] == "setup":
            sets = sets[:2] + as_set_arguments(rehearsal_overrides())
        done = subprocess.run([sys.executable, "easy_train.py", *command, *sets], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=2400)
        assert done.returncode == 0, (command, done.stdout[-4000:], done.stderr[-4000:])
    assert (head.out / "rehearsal-easy" / "hub-upload" / "README.md").is_file()

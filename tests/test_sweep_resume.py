"""A sweep survives its driver (issue 11, item 9): ``python ray_jobs/tune.py --resume NAME``
continues the sweep NAME with ``Tuner.restore``, and exports its winner as a normal run does.

Without Ray: the refusals, exit code 2 (a name with nothing to resume, an override that would
change the sweep), and the plumbing (a resume restores Tune's experiment with the saved config
instead of starting a new one). Marker ``ray`` (1.5 to 3 minutes on 2 busy CPUs): the real driver
in a subprocess, killed with SIGKILL once Tune has recorded its first trial finished, then
``--resume`` (also ``slow``: ``python -m pytest -m slow tests/test_sweep_resume.py``).

    python -m pytest tests/test_sweep_resume.py
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from catvton import artifacts
from catvton.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tune_job():
    spec = importlib.util.spec_from_file_location("tune_job", ROOT / "ray_jobs" / "tune.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def started_sweep(output_dir: Path, name: str, trials_started: bool = True) -> Path:
    """A sweep folder as a driver leaves it: the saved config and, once its Tuner was built, Ray
    Tune's ``tuner.pkl`` (all that ``Tuner.can_restore`` looks for)."""
    from catvton.train.sweep import SWEEP_CONFIG, tune_experiment

    folder = output_dir / name
    folder.mkdir(parents=True)
    cfg = load_config(TINY, [f"tune.name={name}", f"run.output_dir={output_dir}", "train.max_steps=150"])
    (folder / SWEEP_CONFIG).write_text(json.dumps(cfg.to_dict()))
    if trials_started:
        tune_experiment(folder).mkdir(parents=True)
        (tune_experiment(folder) / "tuner.pkl").write_bytes(b"")
    return folder


def test_resuming_a_sweep_with_nothing_to_resume_exits_2_and_says_what_there_is(tmp_path, capsys):
    job = tune_job()
    started_sweep(tmp_path, "earlier")
    started_sweep(tmp_path, "unstarted", trials_started=False)
    where = f"run.output_dir={tmp_path}"

    assert job.main(["--set", where, "--resume", "missing"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume for sweep 'missing'" in err and "no sweep of that name ran there" in err
    assert "sweeps there that can be resumed: earlier)" in err  # not "unstarted"
    assert "python ray_jobs/tune.py --set tune.name=missing` (without --resume)" in err

    assert job.main(["--set", where, "--resume", "unstarted"]) == 2
    assert "it stopped before its first trial started" in capsys.readouterr().err

    assert job.main(["--set", f"run.output_dir={tmp_path / 'elsewhere'}", "--resume", "earlier"]) == 2
    assert "no sweep there can be resumed" in capsys.readouterr().err


def test_a_resume_accepts_the_sweeps_own_overrides_and_refuses_changes(tmp_path, capsys):
    from catvton.train.sweep import resume_problems, saved_sweep_config

    started_sweep(tmp_path, "s")
    saved = saved_sweep_config(tmp_path, "s")
    assert (saved.tune.name, saved.train.max_steps, saved.run.output_dir) == ("s", 150, str(tmp_path))
    # the command the sweep started with, plus --resume: same values, or a folder that locates it
    same = ["train.max_steps=150", "tune.name=s", "run.output_dir=/moved", "train.lr=4e-3"]
    assert resume_problems(saved, same) == []
    assert resume_problems(saved, ["train.max_steps=300", "tune.ranks=[32,8]"]) == [
        "train.max_steps=300: sweep 's' started with 150, and a resumed sweep keeps its config; drop this --set, "
        "or start a new sweep under another tune.name"]

    changed = ["--set", f"run.output_dir={tmp_path}", "--set", "train.max_steps=300", "--resume", "s"]
    assert tune_job().main(changed) == 2
    assert "train.max_steps=300: sweep 's' started with 150" in capsys.readouterr().err


class RecordingTuner:
    """Stands in for ``ray.tune.Tuner``: records how it was built or restored; ``fit`` returns one
    completed trial. Built, it writes ``tuner.pkl`` where the real one does."""

    built: list[dict] = []
    restored: list[dict] = []
    result = None

    def __init__(self, trainable, param_space, tune_config, run_config):
        self.built.append({"trainable": trainable, "param_space": param_space, "run_config": run_config})
        experiment = Path(run_config.storage_path) / run_config.name
        experiment.mkdir(parents=True, exist_ok=True)
        (experiment / "tuner.pkl").write_bytes(b"")

    @classmethod
    def restore(cls, path, trainable, **flags):
        cls.restored.append({"path": path, "trainable": trainable, **flags})
        return cls.__new__(cls)

    def fit(self):
        return [self.result]


def test_a_resume_restores_the_saved_tune_experiment_instead_of_starting_a_new_one(tmp_path, monkeypatch):
    import pandas as pd
    import ray.tune

    from catvton.train import sweep

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / artifacts.MANIFEST).write_text(json.dumps({"counts": {"train": {"lower": 64}, "val": {}, "test": {}}}))
    monkeypatch.setattr(sweep, "build_latent_cache", lambda cfg, **kw: cache)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    weights = tmp_path / "trial" / "lora"
    weights.mkdir(parents=True)
    for name in (artifacts.LORA_WEIGHTS, artifacts.TRAINING_CONFIG):
        (weights / name).write_text(name)
    monkeypatch.setattr(RecordingTuner, "result", SimpleNamespace(
        metrics={"step": 150, "weights_dir": str(weights), "run_dir": str(weights.parent)},
        config={"lr": 4e-3, "rank": 8}, path=str(tmp_path / "run_trial_x_00000"), error=None,
        metrics_dataframe=pd.DataFrame({"step": [100, 150], "val_loss": [0.5, 0.4]})))
    monkeypatch.setattr(RecordingTuner, "can_restore", ray.tune.Tuner.can_restore, raising=False)  # the real check
    monkeypatch.setattr(RecordingTuner, "built", [])
    monkeypatch.setattr(RecordingTuner, "restored", [])
    monkeypatch.setattr(ray.tune, "Tuner", RecordingTuner)

    cfg = load_config(TINY, ["tune.name=s", f"run.output_dir={tmp_path / 'out'}", "train.max_steps=150"])
    first = sweep.run_sweep(cfg, log=lambda _: None)
    assert len(RecordingTuner.built) == 1 and not RecordingTuner.restored
    saved = sweep.saved_sweep_config(tmp_path / "out", "s")
    assert saved.to_dict() == cfg.to_dict()  # every value, run.output_dir made absolute

    again = sweep.run_sweep(saved, log=lambda _: None, resume=True)
    assert len(RecordingTuner.built) == 1, "a resume must not start a new sweep"
    experiment = tmp_path / "out" / "s" / "tune" / "s"
    assert RecordingTuner.restored == [{"path": str(experiment), "trainable": sweep.run_trial,
                                        "resume_unfinished": True, "resume_errored": True}]
    built = RecordingTuner.built[0]
    assert built["trainable"] is sweep.run_trial  # Tune refuses another trainable on restore
    assert Path(built["run_config"].storage_path) / built["run_config"].name == Path(RecordingTuner.restored[0]["path"])
    assert again.release_dir == first.release_dir == tmp_path / "out" / "s" / "release"
    assert again.winner == first.winner and again.winner["val_loss"] == 0.4
    assert (again.release_dir / artifacts.LORA_WEIGHTS).read_text() == artifacts.LORA_WEIGHTS


# --------------------------------------------------------------------------------------------
# a real driver, killed, and resumed
# --------------------------------------------------------------------------------------------

STEPS = 20
NAME = "resume-me"
SWEEP = [f"tune.name={NAME}", f"train.max_steps={STEPS}", "train.val_every=10", "tune.grace_period=10",
         f"train.checkpoint_every={STEPS}", "train.val_batches=1", "run.samples=1", "infer.steps=2",
         "run.wandb_mode=disabled", "tune.lr_grid=[4.0e-3]", "tune.ranks=[8,4]"]
"""Two short trials (one learning rate, two ranks), one at a time on 2 CPUs."""


def tune_command(*sets: str, resume: str | None = None) -> list[str]:
    argv = [sys.executable, str(ROOT / "ray_jobs" / "tune.py")]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--resume", resume] if resume else [])


def recorded_trials(experiment: Path) -> dict[str, str]:
    """``{trial name: status}`` in the latest experiment state Tune saved (what a restore reads);
    empty until the first one is written whole."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except json.JSONDecodeError:  # caught while Tune writes it
        return {}
    trials = [json.loads(state) for state, _ in data["trial_data"]]
    return {f"{t['trainable_name']}_{t['trial_id']}": t["status"] for t in trials}


def fingerprint(run_dir: Path) -> dict:
    """What training a trial again would change: its exported LoRA, its final metrics, its record
    of restarts."""
    lora = run_dir / "lora" / artifacts.LORA_WEIGHTS
    return {"lora": (hashlib.sha256(lora.read_bytes()).hexdigest(), lora.stat().st_mtime_ns),
            "final": (run_dir / artifacts.FINAL_METRICS).read_text(),
            "resumes": (run_dir / artifacts.RESUMES).is_file()}


@pytest.mark.ray
@pytest.mark.slow  # ~2 min: a real driver killed and resumed; the plumbing runs in the default tier above
@pytest.mark.timeout(2400)
def test_a_sweep_whose_driver_was_killed_is_resumed_and_released(tmp_path):
    from catvton.train.sweep import RELEASE_FILES

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the driver starts its own Ray
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    sets = [*SWEEP, f"run.output_dir={tmp_path}"]
    sweep_dir, log = tmp_path / NAME, tmp_path / "driver.log"
    experiment = sweep_dir / "tune" / NAME

    with open(log, "w") as out:
        driver = subprocess.Popen(tune_command(*sets), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: Ray's processes die with it
    try:
        deadline = time.monotonic() + 900  # a guard against a hang, not a timing check
        while "TERMINATED" not in recorded_trials(experiment).values():
            assert driver.poll() is None, f"the driver ended before a trial finished:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no trial finished:\n{log.read_text()[-4000:]}"
            time.sleep(2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = recorded_trials(experiment)  # the second trial is there once Tune has created it
    done = [name for name, status in before.items() if status == "TERMINATED"]
    assert len(done) == 1, f"the sweep ended before the kill, nothing to resume: {before}"
    kept = fingerprint(sweep_dir / "trials" / done[0])
    assert not (sweep_dir / "release").exists()

    resumed = subprocess.run(tune_command(*sets, resume=NAME), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "== sweep finished ==" in resumed.stdout and "winner: lr" in resumed.stdout

    # Tune kept the trials it had (same names) and ran the rest: two trials, all finished
    after = recorded_trials(experiment)
    assert set(before) <= set(after) and len(after) == 2 and set(after.values()) == {"TERMINATED"}, (before, after)
    assert sorted(p.name for p in (sweep_dir / "trials").iterdir()) == sorted(after)
    # the finished trial was not trained again: same LoRA file, same final metrics, no restart
    assert fingerprint(sweep_dir / "trials" / done[0]) == kept
    # the release folder, as a normal run writes it
    release = sweep_dir / "release"
    for name in RELEASE_FILES:
        assert (release / name).is_file(), name
    table = json.loads((release / "trials.json").read_text())  # "trial": Tune's folder, <name>_<n>_<params>_<date>
    rows = {name: r for r in table for name in after if r["trial"].startswith(name + "_")}
    assert len(table) == 2 and set(rows) == set(after), [r["trial"] for r in table]
    assert rows[done[0]]["status"] == "completed" and rows[done[0]]["steps"] == STEPS
    assert all(r["status"] in ("completed", "stopped early") for r in rows.values())
    winner = json.loads((release / artifacts.METRICS).read_text())
    assert winner["trials"] == 2 and winner["sweep"] == NAME
    trained = json.loads((release / artifacts.TRAINING_CONFIG).read_text())
    assert (trained["train"]["lr"], trained["lora"]["rank"]) == (winner["lr"], winner["rank"])

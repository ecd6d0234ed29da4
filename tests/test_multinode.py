"""Multi-node behaviour on one machine: a head and two worker nodes (``ray.cluster_utils.Cluster``),
training workers on different nodes, one node killed mid-run, the run finishing from its last
checkpoint. Runs ``cluster/node_loss_drill.py`` in a subprocess: its driver joins its own cluster,
which cannot share a process with the session ``ray_session`` fixture.

Marked ``slow`` (3-5 minutes on 2 shared CPUs: three nodes' start-up, two worker-group starts):

    pytest -m slow tests/test_multinode.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 30, 5


@pytest.mark.slow
def test_a_node_lost_mid_run_is_survived_and_the_run_finishes_from_its_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # the drill starts its own cluster
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cluster/node_loss_drill.py"), "--out", str(tmp_path), "--json",
         str(tmp_path / "result.json"), "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
         "--kill-after-step", str(EVERY), "--read", "stream"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())

    # a node holding a training worker really died, after a registered checkpoint and before the end
    assert r["read"] == "stream", r["read"]  # the workers streamed the split across the lost node
    assert r["removed"] is not None, "no node was killed"
    assert len(r["removed"]["workers_on_node"]) == 1
    killed_at = r["removed"]["checkpoint_step"]
    assert EVERY <= killed_at < STEPS
    # the workers spanned nodes, and a new worker group started on the survivors + replacement
    assert r["distinct_worker_nodes"] >= 3 and r["workers_started"] >= 4, r["worker_nodes"]
    assert r["removed"]["node_id"] in r["worker_nodes"].values()
    # the restarted workers loaded a checkpoint taken at or after the one registered before the
    # kill (one more may register while the node is being killed), not step 0
    resumed = r["resumed_from_steps"]
    assert resumed and killed_at <= min(resumed) < STEPS, (resumed, killed_at)
    # and the run completed the configured steps with one continuous history
    assert r["final_step"] == STEPS and r["checkpoint_step"] == STEPS
    assert r["history_steps"] == list(range(0, STEPS + 1, EVERY)), r["history_steps"]
    assert (Path(r["weights_dir"]) / "pytorch_lora_weights.safetensors").is_file()
    assert Path(r["checkpoint"]).is_relative_to(tmp_path / "storage" / "node-loss")


@pytest.mark.parametrize("cpus, workers, per_worker, size, materialize, why", [
    (6, 2, 2, 2 << 30, False, "stream"),               # CPUs left for the read, a big split
    (6, 2, 2, 100 << 20, True, "100 MiB"),              # a small split is held, not re-read each epoch
    (2, 2, 1, 2 << 30, True, "leave 0 CPU"),           # workers hold every CPU: a stream would starve
    (2, 1, 1.5, 2 << 30, True, "leave 0.5 CPU"),
    (64, 8, 4, 1 << 30, False, "32 CPUs free"),         # exactly SMALL_SPLIT_BYTES streams
])
def test_the_job_chooses_how_the_workers_read_the_split(cpus, workers, per_worker, size, materialize, why):
    from catvton.train.job import read_mode

    got, reason = read_mode(cpus, workers, per_worker, size)
    assert got is materialize and why in reason, reason
    assert reason.startswith("materialize" if materialize else "stream")

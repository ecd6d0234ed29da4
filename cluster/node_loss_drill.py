"""Node-loss drill: the training job on a three-node Ray cluster on one machine, one node killed
mid-run, and the run finishing from its last checkpoint.

``ray.cluster_utils.Cluster`` starts a head and two worker nodes as real Ray processes (own raylet,
object store and workers each; storage shared through a local folder, as NFS would share it).
Every node has two CPUs and each training worker asks for two, so the two workers always sit on
two different nodes. Once the first checkpoint is in storage, the drill kills a node that hosts a
training worker (``remove_node``: its raylet and workers die at once, like a lost VM) and adds
a fresh node in its place, as the autoscaler would. Ray Train's ``FailureConfig`` restarts the
worker group, each worker loads the last checkpoint, and the run ends at ``train.max_steps``.
The workers stream the training split by default, as the production job does (``--read``).

    python cluster/node_loss_drill.py                       # 2 CPUs, ~1-2 minutes, prints JSON
    python cluster/node_loss_drill.py --steps 60 --out /tmp/drill --json /tmp/drill/result.json
    python cluster/node_loss_drill.py --read materialize    # the split held in the object store

The test ``tests/test_multinode.py`` runs this file in a subprocess (a Ray driver can only
connect to one cluster per process) and asserts on the JSON and the checkpoints.

Needs the tiny base in the cache (built here on first use through ``catvton.offline.resolve``);
the small latent cache (40 synthetic items) is built into ``$CATVTON_CACHE`` on the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["data.synthetic_pids=40", "data.val_fraction=0.2", "data.test_fraction=0.2",
         "model.transformer_override=null", "train.batch_size=4", "train.warmup_steps=2"]
"""The small preset of tests/test_train.py: the tiny base's own transformer on 40 synthetic items."""

NODE_CPUS = 2
"""Logical CPUs of every drill node (and of every training worker)."""

WORKER_CLASS = "RayTrainWorker"
"""Ray Train's worker actor class (ray.train.v2); the drill finds the training workers by it."""


def latest_checkpoint_step(run_storage: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered (0 if none).

    Read from the controller's ``checkpoint_manager_snapshot.json``, not from the checkpoint
    folders: a folder exists before the controller has collected every worker's report, and a
    node lost in that gap restarts the run from the previous checkpoint."""
    try:
        snapshot = json.loads((run_storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being rewritten
        return 0
    return max((int(r["metrics"]["step"]) for r in snapshot.get("checkpoint_results", [])), default=0)


def training_workers() -> dict[str, str]:
    """actor id -> node id of every live Ray Train worker, from the GCS actor table (the state
    API would need the dashboard, which the drill does not start)."""
    import ray._private.state

    table = ray._private.state.actors()
    return {aid: a["Address"]["NodeID"] for aid, a in table.items()
            if a.get("ActorClassName") == WORKER_CLASS and a.get("State") == "ALIVE"}


class NodeKiller:
    """Watches the workers and the checkpoints; after the first checkpoint at or past
    ``after_step``, kills one worker node hosting a training worker and starts a replacement.

    Runs in the main thread (``poll`` in a loop): starting a Ray node installs signal handlers,
    which Python allows only there, so the training runs in a thread instead."""

    def __init__(self, cluster, run_storage: Path, after_step: int):
        self.cluster, self.run_storage, self.after_step = cluster, run_storage, after_step
        self.seen: dict[str, str] = {}
        """Every training worker seen alive: actor id -> node id."""
        self.removed: dict | None = None

    def poll(self) -> None:
        self.seen.update(training_workers())
        if self.removed is None:
            step = latest_checkpoint_step(self.run_storage)
            if step >= self.after_step:
                self._kill(step)

    def _kill(self, step: int) -> None:
        alive = training_workers()
        hosts = set(alive.values())
        victims = [n for n in self.cluster.worker_nodes if n.node_id in hosts]
        if not victims:
            return  # the workers are (re)starting; try at the next poll
        victim = sorted(victims, key=lambda n: n.node_id)[0]
        self.cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: a node lost, not drained
        replacement = self.cluster.add_node(num_cpus=NODE_CPUS)
        self.removed = {"node_id": victim.node_id, "checkpoint_step": step,
                        "workers_on_node": sorted(a for a, n in alive.items() if n == victim.node_id),
                        "replacement_node_id": replacement.node_id}
        print(f"[drill] killed node {victim.node_id[:8]} (training workers on it: "
              f"{len(self.removed['workers_on_node'])}) after checkpoint step {step}; "
              f"replacement {replacement.node_id[:8]} joined", flush=True)


def run_drill(work: Path, steps: int, checkpoint_every: int, kill_after_step: int, read: str = "stream") -> dict:
    """Start the cluster, train, kill a node, and return what happened (see ``main``)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every node's workers (see the cluster below)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # the shards' bars would flood the log
    # A private temp dir: Cluster writes its address to <RAY_TMPDIR>/ray/ray_current_cluster, and a
    # plain ray.init() elsewhere on this machine must not find and join the drill's cluster.
    # Kept short: Ray's socket paths must stay under 108 bytes.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rdrill", dir="/tmp")
    import ray
    from ray.cluster_utils import Cluster

    from catvton.cache.build import build_latent_cache
    from catvton.config import load_config
    from catvton.offline import resolve
    from catvton.ray_utils import init_ray
    from catvton.train.job import checkpoint_state, fit

    name = "node-loss"
    cfg = load_config(ROOT / "configs/tiny.yaml", SMALL + [
        "train.num_workers=2", "train.cpus_per_worker=2", f"train.max_steps={steps}",
        f"train.checkpoint_every={checkpoint_every}", f"train.val_every={checkpoint_every}", "train.val_batches=1",
        "train.max_failures=3", f"run.name={name}", f"run.storage_path={work / 'storage'}",
        f"run.output_dir={work / 'out'}", "run.wandb_mode=disabled"])
    cfg = resolve(cfg)  # the tiny base and the synthetic rows (no alpha: SMALL sets no override)

    # Two logical CPUs a node and two a training worker: no node holds both workers, so they span
    # nodes whatever Ray's PACK placement picks, and a node's CPUs stay free for Ray Data tasks.
    # The machine has 2 cores: OMP_NUM_THREADS=1 keeps Ray from giving each worker 2 torch threads.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # init_ray joins it, as under `ray job submit`
    try:
        init_ray()
        cache = build_latent_cache(cfg, progress=False)
        killer = NodeKiller(cluster, work / "storage" / name, kill_after_step)
        done: dict = {}

        def train() -> None:
            try:
                # stream: the read restarts with the new worker group; materialize: blocks held
                # by the lost node are rebuilt from lineage; auto: the job's own choice (read_mode)
                done["outcome"] = fit(cfg, cache, materialize={"auto": None, "stream": False, "materialize": True}[read])
            except BaseException as e:  # re-raised in the main thread
                done["error"] = e

        t0 = time.time()
        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        while trainer.is_alive():
            killer.poll()
            trainer.join(timeout=0.25)
        wall = time.time() - t0
        if "error" in done:
            raise done["error"]
        outcome = done["outcome"]
    finally:
        ray.shutdown()
        cluster.shutdown()

    import torch

    state = checkpoint_state(outcome.checkpoint)
    # The loop prints this line on rank 0 when it starts from a checkpoint; workers' output lands
    # in the session's log files (the drill's private RAY_TMPDIR, so no other Ray's logs).
    resumed = sorted({int(m) for f in Path(os.environ["RAY_TMPDIR"]).glob("ray/session_*/logs/worker-*.out")
                      for m in re.findall(r"\[catvton\] resumed from step (\d+)", f.read_text(errors="replace"))})
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return {
        "max_steps": steps,
        "final_step": outcome.metrics.get("step"),
        "checkpoint_step": int(state["step"]),
        "history_steps": [h["step"] for h in state["history"]],
        "final_loss": outcome.metrics.get("loss"),
        "removed": killer.removed,
        "resumed_from_steps": resumed,
        "worker_nodes": killer.seen,
        "distinct_worker_nodes": len(set(killer.seen.values())),
        "workers_started": len(killer.seen),
        "checkpoint": outcome.checkpoint_uri,
        "weights_dir": str(outcome.weights_dir) if outcome.weights_dir else None,
        "read": outcome.read,
        "fit_wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="work folder (storage_path, outputs); default: a new temp folder")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--steps", type=int, default=30, help="train.max_steps")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--kill-after-step", type=int, default=5, help="kill a node once a checkpoint at or past this step exists")
    p.add_argument("--read", choices=["stream", "materialize", "auto"], default="stream",
                   help="how the workers read the training split: stream (as the production job does), "
                        "materialize (held in the object store), auto (the job's own choice: read_mode)")
    a = p.parse_args(argv)
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="node-loss-drill-"))
    result = run_drill(work.resolve(), a.steps, a.checkpoint_every, a.kill_after_step, a.read)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    ok = result["removed"] is not None and result["final_step"] == a.steps
    print(f"\n[drill] {'PASSED' if ok else 'FAILED'}: node removed after step "
          f"{(result['removed'] or {}).get('checkpoint_step')}, run finished at step {result['final_step']} "
          f"of {a.steps}, training workers on {result['distinct_worker_nodes']} nodes")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

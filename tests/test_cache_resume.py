"""A latent cache build killed halfway resumes: the rerun computes only the parts that were not
complete, and the cache it publishes holds the same rows, byte for byte, as a clean build.

First the part bookkeeping alone, without Ray (a fake part that fails); then the real thing: the
build to kill runs in a subprocess that joins the session's Ray (so SIGKILL ends a driver, not the
cluster) and is killed as soon as it logs its first complete part.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from catvton import artifacts
from catvton.cache import build as E
from catvton.cache import parts as P
from catvton.cache import read as R
from conftest import ROOT, tiny_config

SMALL = ["data.synthetic_pids=40", "data.val_fraction=0.2", "data.test_fraction=0.2",  # as test_preprocess
         "model.transformer_override=null"]
PARTS = 3
PART_DONE = re.compile(r"latent cache: part (\d+) complete")

KILLED_BUILD = """
import sys
from conftest import tiny_config
from catvton.cache.build import build_latent_cache
build_latent_cache(tiny_config(*sys.argv[3:]), cache_root=sys.argv[1], num_parts=int(sys.argv[2]), progress=False,
                   log=lambda line: print(line, flush=True))
"""


class Boom(Exception):
    pass


def test_parts_resume_without_ray(tmp_path):
    """A part that fails leaves the parts before it recorded; the rerun does only the rest."""
    pids = [f"id_{i:08d}" for i in range(30)]
    assert [P.part_of(p, 3) for p in pids] == [P.part_of(p, 3) for p in pids]  # a hash of the pid alone
    parts: list[list[str]] = [[] for _ in range(3)]
    for pid in pids:
        parts[P.part_of(pid, 3)].append(pid)
    assert all(parts), "30 pids fill 3 parts"
    ran: list[int] = []

    def run_part(part_pids: list[str], folder: Path, fail_at: int | None = None) -> dict:
        n = parts.index(part_pids)
        if n == fail_at:
            (folder / "half.parquet").write_text("half")
            raise Boom(n)
        ran.append(n)
        (folder / "split=train").mkdir()
        (folder / "split=train" / "0.parquet").write_text(",".join(part_pids))
        return {"pairs": len(part_pids)}

    work = tmp_path / "latents-x.parts"
    with pytest.raises(Boom):
        P.build_parts(work, parts, lambda p, f: run_part(p, f, fail_at=1), log=lambda _: None)
    assert ran == [0] and sorted(P.load_progress(work, 3)) == [0]
    assert (work / "part-00001.tmp" / "half.parquet").exists()  # a crash leaves it; the rerun deletes it

    said: list[str] = []
    done = P.build_parts(work, parts, run_part, log=said.append)
    assert ran == [0, 1, 2] and sorted(done) == [0, 1, 2]
    assert said[0].endswith("1 of 3 parts already complete in " + str(work) + "; computing 2")
    assert "pairs/s, ETA" in said[-1] and "3/3 parts" in said[-1]
    out = tmp_path / "out"
    P.link_parts(work, 3, out)
    got = sorted(",".join(sorted(f.read_text().split(","))) for f in (out / "split=train").iterdir())
    assert got == sorted(",".join(p) for p in parts) and not list(out.rglob("half*"))

    P.load_progress(work, 4, log=said.append)  # cut for another part count: start over
    assert not work.exists() and "starting over" in said[-1]


def sorted_rows(folder: Path, split: str) -> dict[str, list]:
    table = pq.read_table(R.split_files(folder, split))
    rows = sorted(table.to_pylist(), key=lambda r: (r["pid"], r["person_pose"]))
    return {c: [r[c] for r in rows] for c in table.column_names}


@pytest.mark.ray
@pytest.mark.slow  # two builds and a kill (~3-4 min); the resume itself: test_parts_resume_without_ray
def test_killed_build_resumes_and_equals_a_clean_build(tmp_path, ray_session):
    cfg = tiny_config(*SMALL)
    root = tmp_path / "resumed"
    final = E.cache_dir(cfg, root)
    work = P.work_dir(final)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(root), str(PARTS), *SMALL], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if PART_DONE.search(line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    killed_s = time.time() - t0
    assert proc.returncode == -signal.SIGKILL, "the build ended before its first part:\n" + "".join(seen[-30:])
    assert not (final / artifacts.MANIFEST).exists()
    done_at_kill = {int(k) for k in json.loads((work / P.PROGRESS).read_text())["done"]}
    assert 1 <= len(done_at_kill) < PARTS

    said: list[str] = []
    t0 = time.time()
    assert E.build_latent_cache(cfg, cache_root=root, num_parts=PARTS, progress=False, log=said.append) == final
    resumed_s = time.time() - t0
    computed = {int(m[1]) for line in said if (m := PART_DONE.search(line))}
    assert computed == set(range(PARTS)) - done_at_kill, said
    assert f"{len(done_at_kill)} of {PARTS} parts already complete" in "\n".join(said)
    assert not work.exists() and not list(root.glob("*.tmp-*"))

    t0 = time.time()  # one part: the same path, and the content does not depend on the part count
    clean = E.build_latent_cache(cfg, cache_root=tmp_path / "clean", num_parts=1, progress=False, log=lambda _: None)
    clean_s = time.time() - t0
    a, b = R.load_manifest(final), R.load_manifest(clean)
    for key in ("counts", "pairs", "pids", "rows", "skipped", "latent_shape", "samples"):
        assert a[key] == b[key], key
    for split in ("train", "val", "test"):
        got, want = sorted_rows(final, split), sorted_rows(clean, split)
        assert got.keys() == want.keys() and len(got["pid"]) == a["pairs"][split]
        for column in got:  # target / masked: the same float16 bytes
            assert got[column] == want[column], (split, column)
    with np.load(final / artifacts.SAMPLES) as s, np.load(clean / artifacts.SAMPLES) as t:
        for key in s.files:
            np.testing.assert_array_equal(s[key], t[key])
    print(f"\nkilled after part {sorted(done_at_kill)} at {killed_s:.1f} s; resumed {len(computed)} of {PARTS} parts "
          f"in {resumed_s:.1f} s; clean build (1 part) {clean_s:.1f} s; {sum(a['pairs'].values())} pairs")

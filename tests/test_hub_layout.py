"""The hub path (issue 13, item 6): the code that lists and reads ``hf://datasets/<id>`` parquet,
run against a local stand-in filesystem with the hub's layout (no network), a missing and an
unreadable shard reported by name, and no network -> a short message and exit code 2.

The stand-in is fsspec's ``DirFileSystem`` rooted at a tmp folder: ``datasets/<owner>/<name>/
data/train-0000k-of-00004-<hash>.parquet`` resolves under it exactly as ``HfFileSystem`` resolves
it on the hub, and it goes through the same parameter production fills with ``HfFileSystem()``.
An unreachable hub is a real ``HfFileSystem`` pointed at a local port that nothing listens on.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catvton.config import DataConfig, load_config
from catvton.data.source import (HubUnreachable, SourceError, check_files, iter_rows, missing_shards,
                                 resolve_source)

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "SaffalPoosh/deepFashion-with-masks"
HASHES = ["3e1c2d5b1f0a9c7e", "a41f0e22c9d8b713", "07bd5c6e4a1f2398", "c5e8a90d2b7f4e61"]


@pytest.fixture
def hub(tmp_path):
    """(the stand-in filesystem, the repo folder on disk, rows per shard): 4 shards of 10 synthetic
    pids at 64 px, renamed to the hub's ``-<hash>`` names."""
    from fsspec.implementations.dirfs import DirFileSystem

    from catvton.offline.synthetic import write_dataset

    repo = tmp_path / "hub" / "datasets" / HUB_ID
    rows = {}
    for path, h in zip(write_dataset(repo, num_pids=10, image_size=64, seed=1), HASHES):
        named = path.with_name(path.stem + f"-{h}.parquet")
        path.rename(named)
        rows[f"datasets/{HUB_ID}/data/{named.name}"] = pq.ParquetFile(named).metadata.num_rows
    return DirFileSystem(path=str(tmp_path / "hub")), repo, rows


def test_listing_and_reading_the_hub_layout(hub):
    fs, _, rows = hub
    source = resolve_source(DataConfig(source=HUB_ID), filesystem=fs)
    assert source.name == HUB_ID and source.filesystem is fs
    assert source.files == sorted(rows) == [f"datasets/{HUB_ID}/data/train-0000{k}-of-00004-{HASHES[k]}.parquet"
                                            for k in range(4)]
    assert check_files(source) == rows
    read = list(iter_rows(source, columns=["pid", "pose", "images"]))
    assert len(read) == sum(rows.values())
    assert read[0]["pid"] == "id_00000001" and read[0]["images"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_the_setup_scan_reads_the_hub_layout_through_ray_data(hub, ray_session):
    """The setup scan's Ray Data tasks read the shards' row groups through the stand-in filesystem,
    as production reads them through HfFileSystem (catvton.data.scan)."""
    from catvton.data.scan import scan

    fs, _, rows = hub
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.source={HUB_ID}"])
    scanned = scan(resolve_source(cfg.data, filesystem=fs), cfg, num_actors=1)
    assert len(scanned) == sum(rows.values())
    assert all(r["valid"] for r in scanned)
    assert {r["pid"] for r in scanned} == {f"id_{i:08d}" for i in range(1, 11)}


def test_a_missing_shard_is_named(hub):
    fs, repo, _ = hub
    (repo / "data" / f"train-00002-of-00004-{HASHES[2]}.parquet").unlink()
    with pytest.raises(SourceError) as e:
        resolve_source(DataConfig(source=HUB_ID), filesystem=fs)
    msg = str(e.value)
    assert "missing train-00002-of-00004-*.parquet" in msg and "lists 3 parquet file(s)" in msg
    assert "hf download" in msg and "--data" in msg
    assert not isinstance(e.value, HubUnreachable)


def test_a_missing_shard_of_a_local_folder_is_named(hub):
    _, repo, _ = hub
    for k in (0, 3):
        (repo / "data" / f"train-0000{k}-of-00004-{HASHES[k]}.parquet").unlink()
    with pytest.raises(SourceError, match=r"missing train-00000-of-00004-\*\.parquet, train-00003-of-00004-\*\.parquet"):
        resolve_source(DataConfig(source=str(repo)))


def test_missing_shards_reads_the_names():
    assert missing_shards(["a/train-00000-of-00002.parquet", "a/train-00001-of-00002-ff00.parquet"]) == []
    assert missing_shards(["train-00001-of-00003-ab.parquet", "x.parquet"]) == [
        "train-00000-of-00003-*.parquet", "train-00002-of-00003-*.parquet"]


def test_unreadable_shards_are_named_all_at_once(hub):
    fs, repo, _ = hub
    cut = repo / "data" / f"train-00001-of-00004-{HASHES[1]}.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a download cut off halfway
    junk = repo / "data" / f"train-00003-of-00004-{HASHES[3]}.parquet"
    junk.write_bytes(b"<html>502 Bad Gateway</html>")  # what a proxy saved instead
    source = resolve_source(DataConfig(source=HUB_ID), filesystem=fs)  # the listing is complete
    with pytest.raises(SourceError) as e:
        check_files(source)
    msg = str(e.value)
    lines = msg.splitlines()
    assert [l.split(" ")[0] for l in lines[:2]] == [f"datasets/{HUB_ID}/data/{cut.name}", f"datasets/{HUB_ID}/data/{junk.name}"]
    assert all("is not a readable parquet file" in l for l in lines[:2])
    assert lines[2].startswith("2 of 4 file(s) cannot be used: download those files again")
    assert HASHES[0] not in msg and HASHES[2] not in msg


@pytest.fixture
def closed_port():
    """A local port that refuses connections (bound, never listening) for the test's duration."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def check_unreachable_message(text: str, endpoint: str) -> None:
    assert f"cannot reach the Hugging Face Hub at {endpoint} to list hf://datasets/{HUB_ID}" in text
    assert "ConnectError" in text
    assert f"hf download {HUB_ID} --repo-type dataset" in text
    assert "--data deepFashion-with-masks" in text and "HF_ENDPOINT" in text


def test_production_filesystem_without_a_hub_raises_hub_unreachable(closed_port):
    from huggingface_hub import HfFileSystem

    endpoint = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(HubUnreachable) as e:
        resolve_source(DataConfig(source=HUB_ID), filesystem=HfFileSystem(endpoint=endpoint, skip_instance_cache=True))
    check_unreachable_message(str(e.value), endpoint)


def no_hub_env(port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


def test_setup_without_a_hub_says_so_in_a_few_lines_and_exits_2(closed_port):
    """The production command; HF_ENDPOINT at a closed port is the network being down, without
    waiting on DNS (the same ConnectError as ``[Errno -2] Name or service not known``)."""
    proc = subprocess.run([sys.executable, "easy_train.py", "setup", "--config", "configs/l40s.yaml"], cwd=ROOT,
                          env=no_hub_env(closed_port), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 6, proc.stderr
    assert proc.stderr.startswith("error: cannot reach the Hugging Face Hub")
    check_unreachable_message(proc.stderr, f"http://127.0.0.1:{closed_port}")


@pytest.mark.ray
@pytest.mark.parametrize("job", ["preprocess", "train"])
def test_ray_jobs_without_a_hub_exit_2_with_the_same_message(job, closed_port, monkeypatch, capsys, tmp_path,
                                                              ray_session):
    """``ray_jobs/preprocess.py`` and ``train.py`` on the production config, in this process (Ray
    is up already): the hub is read when the latent cache is built, before any model is loaded."""
    from huggingface_hub import HfFileSystem, constants

    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("CATVTON_CACHE", str(tmp_path))  # the latent cache's lock lands here, not in the user's cache
    HfFileSystem.clear_instance_cache()
    spec = importlib.util.spec_from_file_location(f"job_{job}", ROOT / "ray_jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as e:
        module.main(["--config", str(ROOT / "configs" / "l40s.yaml")])
    HfFileSystem.clear_instance_cache()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= 6, err
    check_unreachable_message(err, endpoint)

"""One home for what stages exchange: ``build_once`` (lock + temp folder + rename) serves every
builder, ``export_atomic`` every exported folder."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest
from conftest import wait_for_a_caller_blocked_on

from catvton import artifacts


def _slow_build(tmp: Path, marker: Path, final: Path) -> None:
    with open(marker, "a") as f:  # one line per build that really ran
        f.write("built\n")
    (tmp / "part").write_text("half")
    wait_for_a_caller_blocked_on(final)  # the other builder waits on the lock while this one builds
    (tmp / "done").write_text("ok")


def _done(folder: Path) -> bool:
    return (folder / "done").is_file()


def _build_in_process(final: str, marker: str) -> str:
    return str(artifacts.build_once(Path(final), lambda tmp: _slow_build(tmp, Path(marker), Path(final)), _done,
                                    log=lambda _: None))


def test_two_concurrent_processes_build_once(tmp_path):
    final, marker = tmp_path / "thing", tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_build_in_process, [(str(final), str(marker))] * 2)
    assert results == [str(final)] * 2
    assert marker.read_text().count("built") == 1, "the second builder waited and reused the folder"
    assert (final / "done").read_text() == "ok" and (final / "part").read_text() == "half"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_two_concurrent_threads_build_once(tmp_path):
    final, marker = tmp_path / "thing", tmp_path / "builds.txt"
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(Path(_build_in_process(str(final), str(marker))))
        except BaseException as e:  # a thread's exception would otherwise only be printed
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [final, final] and marker.read_text().count("built") == 1


def test_a_crashed_build_leaves_nothing_and_an_incomplete_one_is_refused(tmp_path):
    def crash(tmp: Path) -> None:
        (tmp / "part").write_text("half")
        raise RuntimeError("crashed mid-build")

    with pytest.raises(RuntimeError, match="crashed"):
        artifacts.build_once(tmp_path / "x", crash, _done, log=lambda _: None)
    assert not (tmp_path / "x").exists() and [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    with pytest.raises(RuntimeError, match="left it incomplete"):
        artifacts.build_once(tmp_path / "y", lambda tmp: (tmp / "part").write_text("?"), _done, log=lambda _: None)
    (tmp_path / "z").mkdir()
    with pytest.raises(RuntimeError, match="not a complete"):
        artifacts.build_once(tmp_path / "z", lambda tmp: None, _done, log=lambda _: None)


def test_export_atomic_replaces_only_when_complete(tmp_path):
    final = tmp_path / "release"
    artifacts.export_atomic(final, lambda tmp: (tmp / "a.txt").write_text("v1"))
    assert (final / "a.txt").read_text() == "v1"

    def broken(tmp: Path) -> None:
        (tmp / "a.txt").write_text("v2")
        raise OSError("disk full")

    with pytest.raises(OSError):
        artifacts.export_atomic(final, broken)
    assert (final / "a.txt").read_text() == "v1", "a failed export keeps the previous one"
    artifacts.export_atomic(final, lambda tmp: (tmp / "b.txt").write_text("v3"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_content_hash_is_order_independent_and_content_sensitive():
    assert artifacts.content_hash({"a": 1, "b": [1, 2]}) == artifacts.content_hash({"b": [1, 2], "a": 1})
    assert artifacts.content_hash({"a": 1}) != artifacts.content_hash({"a": 2})
    assert len(artifacts.content_hash({})) == 12


def test_every_builder_goes_through_build_once():
    """The cache, the tiny base, the alpha and the synthetic set: one mechanism, no private copy."""
    root = Path(__file__).resolve().parents[1] / "catvton"
    for rel in ("cache/build.py", "offline/tiny_base.py", "offline/alpha.py", "offline/synthetic.py"):
        text = (root / rel).read_text()
        assert "build_once(" in text, rel
        assert "fcntl" not in text and "mkdtemp" not in text and "os.rename" not in text, rel

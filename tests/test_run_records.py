"""The run's own records of its starts, restarts and reported checkpoints (rank 0 writes them,
:func:`catvton.train.loop.record_start` and :func:`catvton.train.loop.record_checkpoint`): a
restart that found no checkpoint is on record, never silent (issue 25)."""

from __future__ import annotations

from catvton import artifacts
from catvton.artifacts import CHECKPOINTS_LOG
from catvton.train.loop import record_checkpoint, record_start


def lines(path):
    return path.read_text().splitlines() if path.is_file() else []


def test_a_first_start_records_itself_and_no_resume(tmp_path):
    run = tmp_path / "run"
    record_start(run, 0, None)
    assert lines(run / CHECKPOINTS_LOG) == ["started at step 0"]
    assert not (run / artifacts.RESUMES).exists()


def test_reported_checkpoints_and_restarts_are_recorded_in_order(tmp_path):
    record_start(tmp_path, 0, None)
    record_checkpoint(tmp_path, 10)
    record_checkpoint(tmp_path, 20)
    record_start(tmp_path, 20, "resumed from step 20")
    record_start(tmp_path, 0, None)  # a later restart whose workers found no checkpoint
    assert lines(tmp_path / CHECKPOINTS_LOG) == ["started at step 0", "checkpoint reported at step 10",
                                                 "checkpoint reported at step 20", "started at step 20",
                                                 "started at step 0"]
    assert lines(tmp_path / artifacts.RESUMES) == [
        "resumed from step 20", "restart 2: no checkpoint reported yet, starting from step 0"]


def test_a_restart_before_any_checkpoint_says_so(tmp_path):
    record_start(tmp_path, 0, None)
    record_start(tmp_path, 0, None)
    assert lines(tmp_path / artifacts.RESUMES) == ["restart 1: no checkpoint reported yet, starting from step 0"]

"""One progress line on the driver's console for a run whose steps happen in Ray Train workers.

Rank 0 posts its latest figures (step, total, loss, lr, s/step) to a small actor, named after the
run, in the job's namespace (:class:`Board`); a thread of the driver reads them while
``trainer.fit()`` runs and draws the bar (:class:`ProgressBar`). An actor works wherever the
workers are, under ``ray job submit`` too. A fit inside a Tune trial draws nothing (``fit``'s
``progress`` is off unless an entry point turns it on).

On a terminal the bar is redrawn in place (tqdm); in a log file (``ray job submit``, output
redirected) a plain line is written at each tenth of the run, or every few minutes.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, TextIO

POLL_S = 1.0
"""Seconds between the driver's reads of the board."""

PLAIN_EVERY_S = 300.0
"""Without a terminal: the longest wait between two progress lines."""


class Board:
    """The latest figures of one run: rank 0 posts them, the driver reads them (a Ray actor)."""

    def __init__(self) -> None:
        self._figures: dict[str, Any] = {}
        self._notes: list[str] = []

    def post(self, figures: dict[str, Any]) -> None:
        self._figures.update(figures)

    def note(self, text: str) -> None:
        self._notes.append(text)

    def read(self) -> tuple[dict[str, Any], list[str]]:
        """The figures, and the notes posted since the last read."""
        notes, self._notes = self._notes, []
        return dict(self._figures), notes


class Poster:
    """Rank 0's end of the board (:func:`connect`): posts without waiting for an answer, so a
    post costs the training loop the submission of one small actor call."""

    def __init__(self, board) -> None:
        self._board = board

    def start(self, step: int, total: int, note: str | None = None) -> None:
        """Before the first step: where the run starts (a resumed run at its step) and ends."""
        if note:
            self._board.note.remote(note)
        self._board.post.remote({"step": step, "total": total})

    def post(self, metrics: dict[str, Any]) -> None:
        """A reported step's figures (``step``, ``loss``, ``lr``, ``sec_per_step`` when present)."""
        figures = {k: float(metrics[k]) for k in ("loss", "lr", "sec_per_step") if k in metrics}
        self._board.post.remote({"step": int(metrics["step"]), **figures})


def connect(address: dict[str, str] | None) -> Poster | None:
    """The poster for the board at ``address`` (``{"name", "namespace"}``, from
    :meth:`ProgressBar.address`), or None when there is none or it cannot be found: a progress
    bar is never a reason for a training run to fail."""
    if not address:
        return None
    import ray

    try:
        return Poster(ray.get_actor(address["name"], namespace=address["namespace"]))
    except ValueError:
        print(f"[catvton] no progress board {address['name']!r} in namespace {address['namespace']!r}: "
              "the driver's console shows no progress bar")
        return None


def format_seconds(s: float) -> str:
    """``1:02:03``, ``2:03``; ``?`` when unknown."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_text(figures: dict[str, Any]) -> str:
    """``loss 0.1234 · lr 3.97e-03 · 0.061 s/step · ETA 2:35``: what is known so far."""
    parts = []
    if "loss" in figures:
        parts.append(f"loss {figures['loss']:.4f}")
    if "lr" in figures:
        parts.append(f"lr {figures['lr']:.2e}")
    sps = figures.get("sec_per_step")
    if sps is not None:
        parts.append(f"{sps:.3f} s/step")
    left = figures.get("total", 0) - figures.get("step", 0)
    eta = format_seconds(0 if left <= 0 else left * sps if sps is not None else math.nan)
    parts.append(f"ETA {eta}")
    return " · ".join(parts)


class ProgressBar:
    """The driver's end: creates the run's :class:`Board` and draws it until closed.

    Use as a context manager around ``trainer.fit()``; hand :meth:`address` to the workers. Not
    ``enabled``: no actor, no thread, no output (``address`` is None)."""

    def __init__(self, run_name: str, enabled: bool = True, stream: TextIO | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.run_name = run_name
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._log = log
        self._board = None
        self._name = f"catvton-progress-{run_name}-{uuid.uuid4().hex[:8]}"
        self._namespace = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None  # tqdm, on a terminal
        self._plain_at = (-1, -1.0, 0.0)  # (step, fraction, time) of the last plain line
        self._shown: dict[str, Any] = {}

    def address(self) -> dict[str, str] | None:
        return {"name": self._name, "namespace": self._namespace} if self._board is not None else None

    def __enter__(self) -> "ProgressBar":
        if not self.enabled:
            return self
        import ray

        self._namespace = ray.get_runtime_context().namespace
        self._board = ray.remote(num_cpus=0)(Board).options(name=self._name, namespace=self._namespace).remote()
        self._thread = threading.Thread(target=self._run, name="catvton-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._board is None:
            return
        import ray

        self._stop.set()
        self._thread.join()
        self._draw(final=True)
        if self._bar is not None:
            self._bar.close()
        ray.kill(self._board)
        self._board = None

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        import ray

        try:
            figures, notes = ray.get(self._board.read.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001  (the bar must never stop the run)
            if final:
                self._log(f"[catvton] progress unavailable: {type(e).__name__}: {e}")
            return
        for note in notes:
            self._write(f"[catvton] {note}")
        if "total" not in figures:
            return
        if _redrawable(self._stream):
            if figures != self._shown:
                self._draw_bar(figures)
        else:
            self._draw_line(figures, final)
        self._shown = figures

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def _draw_bar(self, figures: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=figures["total"], initial=figures["step"], desc=self.run_name, unit="step",
                             file=self._stream, dynamic_ncols=True, mininterval=0,
                             bar_format="{desc} {n_fmt}/{total_fmt} steps |{bar}| {percentage:3.0f}% "
                                        "[{elapsed}{postfix}]")
        self._bar.total = figures["total"]
        self._bar.n = figures["step"]
        self._bar.set_postfix_str(progress_text(figures), refresh=False)
        self._bar.refresh()

    def _draw_line(self, figures: dict[str, Any], final: bool) -> None:
        step, total = figures["step"], figures["total"]
        fraction = step / total if total else 1.0
        last_step, last_fraction, last_time = self._plain_at
        now = time.monotonic()
        due = final or fraction >= last_fraction + 0.1 or now - last_time >= PLAIN_EVERY_S
        if step == last_step or not due:
            return
        self._plain_at = (step, fraction, now)
        print(f"{self.run_name} {step}/{total} steps {100 * fraction:3.0f}% · {progress_text(figures)}",
              file=self._stream, flush=True)


def _redrawable(stream: TextIO) -> bool:
    """A terminal with a known width: tqdm redraws in place. A pty of width 0 (``script``, some CI
    runners) would show an empty bar: plain lines there."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # no fileno: a captured stream (CliRunner, pytest)
        return False

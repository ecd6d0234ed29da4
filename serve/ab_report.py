"""The A/B report: what the service's event log says about its experiments (issue 28, item 2).

    python -m serve.ab_report --events outputs/serve/events.sqlite                  # every request
    python -m serve.ab_report --events outputs/serve/events.sqlite --experiment lora-v2-vs-v1
    python -m serve.ab_report --events outputs/serve/events.sqlite --json           # for a script

Reads the log (:class:`serve.experiments.EventLog`) while the service keeps writing it (WAL) and
prints :func:`serve.experiments.summary` as two tables; ``--json`` prints the summary itself.
Exit code 2 when the file is missing or not an event log, so that a typo in a cron job is loud
instead of an empty report.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from serve.experiments import EventLog, summary

COLUMNS = """\
arms (one row per model):
  model        the model id the requests were answered by
  requests     requests recorded for it (all statuses)
  p50 s, p95 s median and 95th percentile latency in seconds, over successful (< 400) requests
  5xx          share of its requests that failed on the server (status >= 500)
  4xx          share refused as the client's fault (400..499)
  rating       mean 1..5 rating of its answers ("-": none yet)
  n rated      how many ratings that mean is over

pairs (one row per two models compared side by side):
  pair         the two models, "a vs b"
  n            comparisons: choices where a user saw one answer of each and preferred one
  wins         how many of them each model won, in the pair's order
  leader rate  the share won by the model with more wins (the first on a tie)
  95% CI       the Wilson score interval of that share
  verdict      "winner: <model>" when the interval excludes 0.5, "no difference yet" otherwise
  needed       comparisons at which the interval at the observed rate would exclude 0.5
               ("-": the rate is exactly 0.5, no number of comparisons separates it)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.ab_report", description=__doc__.split("\n\n")[0],
                                epilog=COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=Path, required=True, help="the service's event log (an SQLite file)")
    p.add_argument("--experiment", default=None, help="only this experiment's requests and choices (default: all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    return p.parse_args(argv)


def render(s: dict[str, Any]) -> str:
    """The summary as two fixed-width tables."""
    title = f"experiment {s['experiment']}" if s["experiment"] else "all requests"
    rows = [["model", "requests", "p50 s", "p95 s", "5xx", "4xx", "rating", "n rated"]]
    for model, a in s["arms"].items():
        rows.append([model, str(a["requests"]), _num(a["p50_latency_s"], 3), _num(a["p95_latency_s"], 3),
                     f"{a['error_rate']:.1%}", f"{a['client_error_rate']:.1%}", _num(a["mean_rating"], 2),
                     str(a["ratings"])])
    out = [title, "", _table(rows) if s["arms"] else "no requests recorded", ""]
    rows = [["pair", "n", "wins", "leader rate", "95% CI", "verdict", "needed"]]
    for p in s["pairs"]:
        a, b = p["models"]
        leader = a if p["wins"][a] >= p["wins"][b] else b
        lo, hi = p["interval"][leader]
        rows.append([f"{a} vs {b}", str(p["comparisons"]), f"{p['wins'][a]}:{p['wins'][b]}",
                     f"{leader} {p['rate'][leader]:.3f}", f"{lo:.3f}..{hi:.3f}", p["verdict"],
                     _num(p["samples_needed"], 0)])
    out.append(_table(rows) if s["pairs"] else "no side-by-side comparisons recorded")
    if s["same_model_choices"]:
        out.append(f"({s['same_model_choices']} choices between two answers of one model left out)")
    return "\n".join(out)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.events.is_file():
        print(f"ab_report: no event log at {args.events}: pass the file the service writes (--events PATH)",
              file=sys.stderr)
        return 2
    try:
        with EventLog(args.events) as log:
            s = summary(log, args.experiment)
    except sqlite3.DatabaseError as e:
        print(f"ab_report: {args.events} is not an event log ({e})", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Starting or joining Ray the same way from every entry point, and keeping Ray's own output off
the console: it goes to the Ray session's log files, which :func:`run_logs` puts in the run's
folder.

A local Ray (no ``RAY_ADDRESS``) belongs to the process that starts it: its own temp dir, so two
jobs started at once never share a session, its logs or a ``ray_current_cluster`` file (a plain
``ray.init()`` elsewhere starts its own Ray instead of finding this one), and the dashboard on
127.0.0.1. Under ``ray job submit`` (``RAY_ADDRESS`` set) the job joins the cluster as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
"""Ray's Python loggers whose records the driver keeps off the console (and writes to a file)."""

DRIVER_LOG = "catvton-driver-{pid}.log"
"""The driver's own Ray log records, beside the session's other logs."""

_local_logs: Path | None = None
"""The ``logs`` folder of the local Ray session this process started (None: none, or a cluster)."""


def init_ray(num_cpus: int | None = None, dashboard: bool = True, log: Callable[[str], None] = print) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local Ray.

    Locally: no usage-stats prompt, no auth token file, a temp dir of this process's own (short,
    under /tmp: Ray's socket paths must stay under 108 bytes) and the dashboard on 127.0.0.1
    unless ``dashboard`` is False. Either way the workers' output stays in Ray's log files
    (``log_to_driver=False``: Ray Train logs every report, Ray Data draws bars every epoch), and
    Ray's loggers on this driver show only warnings (the rest: ``DRIVER_LOG`` in the session's
    logs). Prints one line: the dashboard's URL and where Ray's logs are. Does nothing if Ray is
    already initialised.
    """
    global _local_logs
    import ray
    import ray.data  # noqa: F401  (it configures its loggers on import: before they are quieted)

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        _quiet_console()
        context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        url = _url(context.dashboard_url)
        _log_to_file(_session_logs())
        log(f"Ray: joined the cluster at {os.environ['RAY_ADDRESS']}; dashboard: {url or 'none'} "
            "(workers' output: its Logs tab, or `ray logs`)")
        return
    temp = tempfile.mkdtemp(prefix="rct", dir="/tmp")
    # Ray Train's placement-group cleaner asks the State API (served by the dashboard) for its
    # controller every second, without an address; with several local Rays on the machine it
    # cannot tell which is its own and logs "Failed to query Ray Train Controller actor state".
    # Told the GCS address (chosen here: it must be known before Ray starts), it finds it. With
    # no dashboard there is no State API: the warning then stays in the cleaner's log file.
    chosen = "RAY_GCS_SERVER_PORT" not in os.environ  # a port the user set is theirs to keep
    if chosen:
        os.environ["RAY_GCS_SERVER_PORT"] = str(_free_port())
    gcs = f"{ray.util.get_node_ip_address()}:{os.environ['RAY_GCS_SERVER_PORT']}"
    _quiet_console()
    try:
        context = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                           _temp_dir=temp, log_to_driver=False,
                           runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": gcs}})
    finally:
        if chosen:
            del os.environ["RAY_GCS_SERVER_PORT"]
    _local_logs = _session_logs()
    _log_to_file(_local_logs)
    url = _url(context.dashboard_url)
    shown = f"dashboard {url}" if dashboard and url else "dashboard off (--no-dashboard)" if not dashboard \
        else "dashboard unavailable (see dashboard.log in Ray's logs)"
    log(f"Ray: local instance, {shown}; Ray's logs: {_local_logs}")


def run_logs(run_dir: Path, log: Callable[[str], None] = print):
    """Context manager: while the block runs, ``run_dir/ray_logs/<session>`` links to the logs of
    the local Ray this process started (workers' stdout/stderr, Ray Train, Ray Data); at the end
    they are copied there, so the run's folder keeps them after /tmp is cleaned. Prints the
    folder once. Does nothing on a cluster (its logs are per node: the dashboard, ``ray logs``)."""
    return _run_logs(run_dir, log)


@contextmanager
def _run_logs(run_dir: Path, log: Callable[[str], None]) -> Iterator[Path | None]:
    source = _local_logs
    if source is None:
        yield None
        return
    target = run_dir / "ray_logs" / source.parent.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or not target.exists():
        target.unlink(missing_ok=True)
        target.symlink_to(source, target_is_directory=True)
    log(f"Ray's logs of this run (workers, Ray Train, Ray Data): {target}")
    try:
        yield target
    finally:
        if target.is_symlink():
            target.unlink()
        # a snapshot of files that Ray keeps writing: one that vanishes mid-copy is skipped
        try:
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        except shutil.Error as e:
            log(f"warning: {len(e.args[0])} Ray log file(s) could not be copied into {target}; "
                f"all of them are in {source}")


def _quiet_console() -> None:
    """On this driver's console, only warnings of Ray's loggers (errors of Ray Data, whose
    warnings are tuning hints; they stay in its ray-data.log). See :func:`_log_to_file`."""
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.ERROR if name == "ray.data" else logging.WARNING)


def _session_logs() -> Path | None:
    """The ``logs`` folder of the Ray session this driver is connected to (None: a Ray Client
    driver, ``ray://``, has no local session)."""
    import ray

    node = ray._private.worker._global_node
    return Path(node.get_logs_dir_path()) if node is not None else None


def _log_to_file(logs: Path | None) -> None:
    """INFO and up of Ray's loggers on this driver into ``DRIVER_LOG`` in ``logs``."""
    if logs is None:
        return
    path = logs / DRIVER_LOG.format(pid=os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if name == "ray" or not logger.propagate:
            logger.addHandler(to_file)


def _url(address: str | None) -> str | None:
    if not address:
        return None
    return address if "://" in address else f"http://{address}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]

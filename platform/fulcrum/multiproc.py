"""Where each process group keeps its prometheus-client multiprocess files, and how stale files go away.

PROMETHEUS_MULTIPROC_DIR (the root) is shared by everything Fulcrum runs on one machine or in one container:

    <root>/*.db                         the web group (runserver, or the gunicorn master and its workers) and
                                        short-lived commands (`manage.py prompt label ...`); served by the web
    <root>/worker-<host>-<pid>/*.db     one `manage.py worker` and its pool children; served on its own port
    <root>/worker-<host>-<pid>.lock     held (flock) while that worker or any of its children lives
    <root>/beat-<host>-<pid>/...        the same for `manage.py beat`

A group's main process calls `claim(role)` before anything records a sample. For a worker or beat it starts an
empty directory of its own (removing any leftover one of the same name), points PROMETHEUS_MULTIPROC_DIR at it so
its children inherit it, and removes the directories of groups whose lock nobody holds any more (their processes
are gone). For the web it takes `<root>/.web.lock` and removes the top-level files of processes that no longer
exist; a second web server started on the same root while the first lives joins it and removes nothing.
So a restart starts from zero (Prometheus reads that as a counter reset) and no start removes a live sibling's
files. Files of exited children are pruned at every scrape: their live gauges are dropped (`mark_process_dead`),
while their counters and histograms stay in the sums, as prometheus-client intends.

The root must be local to one machine (or container): process ids and locks mean nothing across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

ROOT_VAR = "FULCRUM_METRICS_ROOT"
ROLES = ("web", "worker", "beat")
_PID_IN_NAME = re.compile(r"_(\d+)\.db$")
# Lock files stay open for the life of the process (and of its forked children, which share them).
_held: list[TextIO] = []
_claimed: dict[tuple[str, int], Path] = {}  # (role, pid) -> directory: a second claim returns the first


def root() -> Path:
    """The shared root: remembered in FULCRUM_METRICS_ROOT once a group has claimed a directory below it."""
    value = os.environ.get(ROOT_VAR) or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not value:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set (fulcrum.settings sets it)")
    return Path(value)


def current_dir() -> Path:
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def _lock(path: Path) -> TextIO | None:
    """An exclusive flock on `path` (created if missing), or None when another process holds it."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - kept open: the lock lives as long as the handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        # Someone removed the file between our open and our lock: lock the file that is there now.
        handle.close()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_pid(path: str) -> int | None:
    match = _PID_IN_NAME.search(os.path.basename(path))
    return int(match.group(1)) if match else None


def remove_abandoned_groups(base: Path) -> list[str]:
    """Remove worker and beat directories whose lock no live process holds; return their names."""
    removed = []
    for lock_path in sorted(base.glob("*.lock")):
        if lock_path.name.startswith(".") or not lock_path.stem.startswith(tuple(f"{r}-" for r in ROLES)):
            continue
        handle = _lock(lock_path)
        if handle is None:
            continue  # its group is alive
        try:
            shutil.rmtree(base / lock_path.stem, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(lock_path.stem)
        finally:
            handle.close()
    return removed


def claim(role: str) -> Path:
    """Set up this process group's metrics directory; call in the group's main process before any sample.

    Returns the directory the group's processes write to (PROMETHEUS_MULTIPROC_DIR from now on).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if (role, os.getpid()) in _claimed:
        return _claimed[(role, os.getpid())]
    from . import metrics

    base = root()
    base.mkdir(parents=True, exist_ok=True)
    os.environ[ROOT_VAR] = str(base)
    removed = remove_abandoned_groups(base)
    if removed:
        log.info("removed the metrics files of exited process groups: %s", ", ".join(removed))
    if role == "web":
        target = base
        handle = _lock(base / ".web.lock")
        if handle is not None:
            _held.append(handle)
            mapped = _mapped_by_this_process()
            stale = [f for f in glob.glob(str(base / "*.db")) if _stale_top_level_file(f, mapped)]
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            log.info("web metrics in %s (%d stale file(s) removed)", base, len(stale))
        else:
            log.info("web metrics in %s (joined the web server already running there)", base)
    else:
        name = f"{role}-{socket.gethostname()}-{os.getpid()}"
        handle = _lock(base / f"{name}.lock")
        if handle is None:
            raise RuntimeError(f"metrics directory {base / name} is locked by another live process")
        _held.append(handle)
        target = base / name
        # A directory of this name is left from an earlier process with this pid (a restarted container).
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        log.info("%s metrics in %s", role, target)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(target)
    if handle is not None:  # the group's first process, not a web worker joining its master
        metrics.GROUP_START_TIME.labels(role=role).set(time.time())
    metrics.initialise_counters(role)
    _claimed[(role, os.getpid())] = target
    return target


def _mapped_by_this_process() -> set[str]:
    """Files this process has memory-mapped (prometheus-client keeps its sample files mapped); Linux only."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return set()


def _stale_top_level_file(path: str, mapped: set[str]) -> bool:
    pid = _file_pid(path)
    if pid == os.getpid():
        # Left by an earlier process that had our pid (a restarted container), unless we are writing it already.
        return os.path.realpath(path) not in mapped and os.path.exists("/proc/self/maps")
    return pid is None or not _pid_alive(pid)


def prune_dead_processes(path: Path) -> None:
    """Drop the live gauges of processes that exited without saying so (killed children)."""
    pids = {pid for f in glob.glob(str(path / "gauge_live*_*.db")) if (pid := _file_pid(f)) is not None}
    for pid in pids:
        if not _pid_alive(pid):
            mark_process_dead(pid, str(path))


class GroupCollector(Collector):
    """The merged samples of this process group's files, extra collectors, then declarations of the rest."""

    def __init__(self, path: Path | None = None, extra: Iterable[Any] = (), *, web: bool = False) -> None:
        self.path = path
        self.extra = list(extra)
        self.web = web

    def collect(self) -> Iterable[Any]:
        from .metrics import DeclaredMetrics

        path = self.path or current_dir()
        prune_dead_processes(path)
        families = list(MultiProcessCollector.merge(glob.glob(str(path / "*.db")), accumulate=True))
        for collector in self.extra:
            try:
                families.extend(collector.collect())
            except Exception:  # one failing source must not take the others' metrics down
                log.exception("metrics collector %s failed", type(collector).__name__)
        families.extend(DeclaredMetrics((f.name for f in families), scrape_time=self.web).collect())
        return families

"""Waiting for a job that workers run: the one poll loop behind every `wait_for` (experiments, optimisation and
fine-tune jobs), so commands and the demo report progress, notice a dead worker and time out the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

J = TypeVar("J")
P = TypeVar("P")


def poll_until_finished(
    refresh: Callable[[], J],
    *,
    progress: Callable[[J], P],
    finished: Callable[[J], bool],
    timeout: float,
    poll: float = 1.0,
    report: Callable[[J, P], None] | None = None,
    alive: Callable[[], bool] | None = None,
    on_dead: Callable[[], Exception],
    on_timeout: Callable[[], Exception],
) -> J:
    """Re-read the job every `poll` seconds until `finished`; `report` whenever its `progress` changes.

    `alive` is checked only after the job was seen unfinished, so a worker that exits right after finishing the
    job is not taken for a dead one.
    """
    deadline = time.monotonic() + timeout
    last: P | None = None
    while True:
        job = refresh()
        now = progress(job)
        if report is not None and now != last:
            report(job, now)
            last = now
        if finished(job):
            return job
        if alive is not None and not alive():
            raise on_dead()
        if time.monotonic() > deadline:
            raise on_timeout()
        time.sleep(poll)

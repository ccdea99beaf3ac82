"""The poll loop every `wait_for` shares: progress reported on change, a dead worker and a timeout refused."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from registry.waiting import poll_until_finished


def states(*values: int) -> Iterator[int]:
    yield from values


def test_it_reports_each_change_once_and_returns_the_finished_job() -> None:
    seen = states(1, 1, 2, 3)
    reported: list[tuple[int, int]] = []
    job = poll_until_finished(
        lambda: next(seen),
        progress=lambda j: j // 2,
        finished=lambda j: j == 3,
        timeout=10,
        poll=0,
        report=lambda j, p: reported.append((j, p)),
        on_dead=lambda: RuntimeError("dead"),
        on_timeout=lambda: RuntimeError("late"),
    )
    assert job == 3
    assert reported == [(1, 0), (2, 1)]


def test_it_raises_when_the_worker_died_before_the_job_finished() -> None:
    with pytest.raises(RuntimeError, match="dead"):
        poll_until_finished(
            lambda: 0,
            progress=lambda j: j,
            finished=lambda j: False,
            timeout=10,
            poll=0,
            alive=lambda: False,
            on_dead=lambda: RuntimeError("dead"),
            on_timeout=lambda: RuntimeError("late"),
        )


def test_a_worker_that_exits_after_finishing_the_job_is_not_taken_for_dead() -> None:
    job = poll_until_finished(
        lambda: 1,
        progress=lambda j: j,
        finished=lambda j: True,
        timeout=10,
        alive=lambda: False,
        on_dead=lambda: RuntimeError("dead"),
        on_timeout=lambda: RuntimeError("late"),
    )
    assert job == 1


def test_it_gives_up_after_the_timeout() -> None:
    with pytest.raises(RuntimeError, match="late"):
        poll_until_finished(
            lambda: 0,
            progress=lambda j: j,
            finished=lambda j: False,
            timeout=0.05,
            poll=0.01,
            on_dead=lambda: RuntimeError("dead"),
            on_timeout=lambda: RuntimeError("late"),
        )

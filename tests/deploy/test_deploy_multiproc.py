"""fulcrum/multiproc.py: each process group starts clean without touching a live sibling's files.

Each scenario runs in subprocesses, since claiming a directory changes the claiming process's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from deploy_helpers import ROOT

SETUP = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'platform')!r}]\n"


def run(root: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FULCRUM_METRICS_ROOT"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(root)
    result = subprocess.run(
        [sys.executable, "-c", SETUP + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def start(root: Path, code: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "FULCRUM_METRICS_ROOT"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(root)
    return subprocess.Popen(
        [sys.executable, "-c", SETUP + textwrap.dedent(code)], env=env, stdout=subprocess.PIPE, text=True
    )


LIVE_WORKER = """
    import time
    from fulcrum import metrics, multiproc
    print(multiproc.claim("worker"), flush=True)
    metrics.ITEMS_EVALUATED.labels(stack="live").inc(3)
    print("recorded", flush=True)
    time.sleep(60)
"""


def test_a_worker_gets_a_directory_of_its_own_and_a_restart_removes_only_dead_groups(tmp_path: Path) -> None:
    live = start(tmp_path, LIVE_WORKER)
    try:
        live_dir = Path(live.stdout.readline().strip())  # type: ignore[union-attr]
        assert live.stdout.readline().strip() == "recorded"  # type: ignore[union-attr]
        assert live_dir.parent == tmp_path and live_dir.name.startswith("worker-")
        assert live_dir.name.endswith(f"-{live.pid}")
        assert list(live_dir.glob("counter_*.db"))
        # A worker that died without cleaning up, on the same root.
        dead = run(tmp_path, 'from fulcrum import multiproc; print(multiproc.claim("worker"))').strip()
        assert Path(dead).is_dir()
        # The next worker start removes the dead group's files and leaves the live one alone.
        out = run(
            tmp_path,
            """
            from fulcrum import multiproc, metrics
            mine = multiproc.claim("worker")
            metrics.ITEMS_EVALUATED.labels(stack="mine").inc()
            from prometheus_client import generate_latest
            print(mine)
            print(generate_latest(metrics.registry()).decode())
            """,
        )
        mine, scrape = out.split("\n", 1)
        assert not Path(dead).exists() and not Path(f"{dead}.lock").exists()
        assert live_dir.is_dir() and list(live_dir.glob("counter_*.db"))
        # A worker's scrape is its own group's: not the live sibling's samples.
        assert 'fulcrum_evaluation_items_total{stack="mine"} 1.0' in scrape
        assert 'stack="live"' not in scrape
        assert 'fulcrum_process_group_start_time_seconds{role="worker"}' in scrape
    finally:
        live.kill()
        live.wait()
        live.stdout.close()  # type: ignore[union-attr]
    run(tmp_path, 'from fulcrum import multiproc; multiproc.claim("beat")')
    assert not live_dir.exists()


def test_the_web_group_removes_files_of_exited_processes_only(tmp_path: Path) -> None:
    # A command that ran earlier and exited, and one that is still running (this test process stands in for it).
    exited = run(
        tmp_path,
        'from fulcrum import metrics; metrics.LABEL_MOVES.labels(label="old").inc(); import os; print(os.getpid())',
    )
    stale = tmp_path / f"counter_{exited.strip()}.db"
    assert stale.exists()
    running = tmp_path / f"counter_{os.getpid()}.db"
    running.write_bytes(stale.read_bytes())
    web = start(tmp_path, """
        import time
        from fulcrum import multiproc
        multiproc.claim("web")
        print("claimed", flush=True)
        time.sleep(60)
    """)  # fmt: skip
    try:
        assert web.stdout.readline().strip() == "claimed"  # type: ignore[union-attr]
        assert not stale.exists()
        assert running.exists()
        # A second web server on the same root joins the first: it removes nothing.
        late = tmp_path / "counter_999999999.db"
        late.write_bytes(running.read_bytes())
        run(tmp_path, 'from fulcrum import multiproc; multiproc.claim("web")')
        assert late.exists()
    finally:
        web.kill()
        web.wait()
        web.stdout.close()  # type: ignore[union-attr]
        running.unlink()
    # Once the first is gone, the next web start cleans up.
    run(tmp_path, 'from fulcrum import multiproc; multiproc.claim("web")')
    assert not late.exists()


def test_a_killed_childs_live_gauges_leave_the_sum_and_its_counters_stay(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        """
        import os, signal, time
        from prometheus_client import generate_latest
        from fulcrum import metrics, multiproc
        multiproc.claim("worker")
        pid = os.fork()
        if pid == 0:
            metrics.WORKER_PROCESSES.labels(state="idle").set(1)
            metrics.TASKS.labels(task="t", state="succeeded").inc()
            time.sleep(60)
            os._exit(0)
        time.sleep(1.0)
        print(generate_latest(metrics.registry()).decode())
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("=====")
        print(generate_latest(metrics.registry()).decode())
        """,
    )
    before, after = out.split("=====")
    assert 'fulcrum_worker_processes{state="idle"} 1.0' in before
    # The dead child no longer counts; the main process's 0 keeps the series (so "no live process" can alert).
    assert 'fulcrum_worker_processes{state="idle"} 0.0' in after
    assert 'fulcrum_celery_tasks_total{state="succeeded",task="t"} 1.0' in after


def test_undeclared_families_appear_as_help_and_type_only(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        """
        from prometheus_client import generate_latest
        from fulcrum import metrics, multiproc
        multiproc.claim("beat")
        print(generate_latest(metrics.registry()).decode())
        """,
    )
    assert "# TYPE fulcrum_evaluation_regressions_total counter" in out
    assert "# TYPE fulcrum_prompt_fetches_total counter" in out
    assert "fulcrum_evaluation_regressions_total{" not in out
    # Scrape-time results are the web's: a beat or worker does not declare them.
    assert "fulcrum_queue_messages" not in out


def test_a_web_claim_keeps_the_files_its_own_process_writes_and_drops_a_predecessors(tmp_path: Path) -> None:
    donor = run(
        tmp_path,
        'from fulcrum import metrics; metrics.LABEL_MOVES.labels(label="x").inc(); import os; print(os.getpid())',
    )
    donor_file = tmp_path / f"counter_{donor.strip()}.db"
    out = run(
        tmp_path,
        f"""
        import os, shutil
        from pathlib import Path
        root = Path({str(tmp_path)!r})
        # A file with this very pid, left by a process before us (as after a container restart).
        shutil.copy({str(donor_file)!r}, root / f"counter_{{os.getpid()}}.db")
        from fulcrum import metrics, multiproc
        multiproc.claim("web")
        from prometheus_client import generate_latest
        print(generate_latest(metrics.registry()).decode())
        """,
    )  # fmt: skip
    # The predecessor's file (and the exited donor's) is gone, so its label="x" count is not in our sums.
    assert 'label="x"' not in out
    assert "fulcrum_evaluation_runs_total" in out
    # A process that already writes samples and then becomes the web group keeps them.
    out = run(
        tmp_path,
        """
        from prometheus_client import generate_latest
        from fulcrum import metrics, multiproc
        metrics.LABEL_MOVES.labels(label="mine").inc()
        multiproc.claim("web")
        print(generate_latest(metrics.registry()).decode())
        """,
    )
    assert 'fulcrum_prompt_label_moves_total{label="mine"} 1.0' in out

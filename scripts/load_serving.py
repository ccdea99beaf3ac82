"""Load figure for the serving endpoint: requests/s and p99 latency, measured by wrk against a local gunicorn.

    python scripts/load_serving.py                      # SQLite in a temporary folder
    python scripts/load_serving.py --database-url postgresql://postgres@127.0.0.1:5432/fulcrum_load

Two scenarios against GET /api/serve/qa/ (label production) with a read token: a full 200 response, and a
revalidation that gets 304 Not Modified. wrk (Debian package `wrk`) drives the load; it targets 127.0.0.1 only and
stops after --duration seconds per scenario.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_server import running_server  # noqa: E402

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def run_wrk(url: str, headers: list[str], *, threads: int, connections: int, duration: int) -> dict[str, float]:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for header in headers:
        command += ["-H", header]
    out = subprocess.run([*command, url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": total,
        "non_2xx_3xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "none",  # type: ignore[dict-item]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    parser.add_argument("--workers", type=int, default=0, help="gunicorn workers (default: 2 per core)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--duration", type=int, default=15, help="seconds per scenario (at most 120)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    duration = max(1, min(args.duration, 120))
    with running_server(database_url=args.database_url or None, workers=args.workers) as (base, seed):
        url = f"{base}/api/serve/qa/"
        auth = f"Authorization: Bearer {seed['token']}"
        # Warm the workers' database connections first.
        run_wrk(url, [auth], threads=1, connections=4, duration=2)
        results = {
            "200 (full body)": run_wrk(
                url, [auth], threads=args.threads, connections=args.connections, duration=duration
            ),
            "304 (If-None-Match)": run_wrk(
                url,
                [auth, f"If-None-Match: {seed['etag']}"],
                threads=args.threads,
                connections=args.connections,
                duration=duration,
            ),
        }
    database = "PostgreSQL" if args.database_url.startswith("postgres") else "SQLite"
    print(f"GET /api/serve/<name>/ on gunicorn ({database}), wrk -t{args.threads} -c{args.connections} -d{duration}s")
    for name, r in results.items():
        print(
            f"  {name:22} {r['rps']:8.0f} requests/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms   "
            f"({r['requests']} requests, {r['non_2xx_3xx']} non-2xx/3xx, socket errors: {r['socket_errors']})"
        )
    return 0 if all(r["non_2xx_3xx"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

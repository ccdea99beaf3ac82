"""OpenAPI-driven fuzzing of the whole API with the schemathesis CLI, against a local gunicorn.

    python scripts/fuzz_api.py --max-examples 50

The server is migrated and seeded (scripts/serving_server.py) and the run authenticates as an admin with a write
token, so every operation is reachable. The check is `not_a_server_error`: any 5xx is a failure. Loopback only;
the run ends after --max-time seconds at the latest. Prints the operations, requests and failures.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_server import running_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    parser.add_argument("--max-examples", type=int, default=50, help="generated cases per operation and phase")
    parser.add_argument("--max-time", type=int, default=900, help="time budget in seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = Path(tempfile.mkdtemp(prefix="fulcrum-fuzz-"))
    with running_server(database_url=args.database_url or None, workers=2, role="admin") as (base, seed):
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base}/api/schema/",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {seed['token']}",
            "--max-examples",
            str(args.max_examples),
            "--max-time",
            str(args.max_time),
            "--seed",
            str(args.seed),
            "--workers",
            "2",
            "--report",
            "ndjson",
            "--report-dir",
            str(report),
            "--continue-on-failure",
            # Revoking its own token would leave the rest of the run unauthenticated.
            "--exclude-operation-id",
            "tokens_destroy",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
    output = done.stdout + done.stderr
    print("\n".join(output.splitlines()[-40:]))
    requests = statuses = 0
    server_errors = 0
    for ndjson in report.glob("*.ndjson"):
        for line in ndjson.read_text().splitlines():
            for match in re.finditer(r'"status_code":\s*(\d+)', line):
                statuses += 1
                server_errors += int(match.group(1)) >= 500
        requests = statuses
    tested = re.search(r"Tested:\s+(\d+)", output)
    cases = re.search(r"(\d+) generated, (.*)", output)
    print("\n--- figures")
    print(f"operations tested: {tested.group(1) if tested else '?'}")
    print(f"test cases: {cases.group(0) if cases else '?'}")
    print(f"requests (responses recorded): {requests}; 5xx responses: {server_errors}")
    print(f"schemathesis exit code: {done.returncode}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())

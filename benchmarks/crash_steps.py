"""Every step of the crash harness (tests/crash_steps.py): for each scenario, on local disk
and on S3 (moto on 127.0.0.1 through s3fs), the command stopped before each of its
changes to storage in turn, then run again; and each change failing once. Prints steps
tried and failures found; exits non-zero if any is left. The test suite samples these
steps (tests/test_crash_steps.py); this tries them all.

    PYTHONPATH=$PWD python benchmarks/crash_steps.py [--only local|s3] [--scenario TEXT] [--every N]

``--every N`` tries every N-th step only (an S3 try is a few hundred requests to moto).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import crash_steps as C  # noqa: E402
from polling import free_port  # noqa: E402


def backends(only: str | None):
    if only in (None, "local"):
        yield "local", lambda: C.Output(os.path.join(tempfile.mkdtemp(), "out"), {})
    if only in (None, "s3"):
        import s3fs
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}"}

        def bucket():
            name = f"crash-{uuid.uuid4().hex[:12]}"
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(name)
            return C.Output(f"s3://{name}/out", options)

        yield "s3", bucket


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["local", "s3"])
    parser.add_argument("--scenario", metavar="TEXT", help="only the scenarios whose name holds TEXT")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="try every N-th step only")
    args = parser.parse_args()
    total = failures = 0
    started = time.time()
    for backend, make in backends(args.only):
        for scenario in (s for s in C.SCENARIOS if args.scenario is None or args.scenario in s.name):
            steps = C.count_steps(make(), scenario)
            for mode in ("stop", "fail once"):
                found = 0
                for k in range(1, steps + 2, args.every):
                    kwargs = {"stop_at": k} if mode == "stop" else {"fail_at": k}
                    outcome = C.try_step(make(), scenario, **kwargs)
                    total += 1
                    if outcome.problems:
                        found += 1
                        print(f"FAIL {backend} / {scenario.name} / {mode} at step {k}: {outcome.problems[:3]}", flush=True)
                failures += found
                print(f"{backend:5} {scenario.name:40} {mode:9} steps {steps + 1:4} tried {len(range(1, steps + 2, args.every)):4}  failures {found}", flush=True)
    print(f"steps tried {total}, failures {failures}, {time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

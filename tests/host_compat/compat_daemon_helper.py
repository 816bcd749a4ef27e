"""A compat backend in a process of its own, for tests that kill, stop or
break it: python3 compat_daemon_helper.py POLICY_DIR CGROUP STALL_S.
Prints "ready" once the cgroup is governed; then reads commands on stdin:
"crash" makes the responder's next batch raise (its loop dies)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from leash.kernel.compat import CompatBackend  # noqa: E402
from leash.policy.compiler import compile_tables  # noqa: E402
from leash.policy.loader import load_policy_dir  # noqa: E402


def main() -> None:
    policy_dir, cg, stall = sys.argv[1], sys.argv[2], float(sys.argv[3])
    backend = CompatBackend(watchdog_stall_s=stall)
    backend.start(compile_tables(load_policy_dir(policy_dir), {"bot": 1}), "enforce",
                  lambda rec: print(f"record {rec.action} {rec.decision} {rec.reason}", flush=True))
    backend.govern(1, cg)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "crash":
            backend.inject_crash()
            print("armed", flush=True)
    backend.stop()


if __name__ == "__main__":
    main()

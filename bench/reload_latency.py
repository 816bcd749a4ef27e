"""Hot reload latency (DESIGN.md section 6): time from a policy file write to
the new decision being enforced on a running agent, for policy sets of 10, 100
and 1000 policies, with the backend this host picks.

The agent reads a file in a tight loop and prints a timestamp with each
result; a policy change flips that file from allowed to denied. Latency is the
first "denied" timestamp minus the moment the change was written (so it
includes the agent loop's own period, a few ms).

    sudo .venv/bin/python bench/reload_latency.py [--sizes 10,100,1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from policy_compile import policy_text  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_DIR = "/tmp/leash-reload-bench"
SYSTEM = '''
permit (principal, action == Action::"FileOpenReadOnly", resource)
when { resource in [Dir::"/usr/", Dir::"/lib/", Dir::"/lib64/", Dir::"/bin/", Dir::"/etc/", Dir::"/proc/", Dir::"/dev/"] };
permit (principal, action == Action::"ProcessExec", resource)
when { resource in [Dir::"/usr/", Dir::"/bin/", Dir::"/lib/", Dir::"/lib64/"] };
permit (principal, action == Action::"FileOpenReadWrite", resource == File::"/dev/null");
'''
LOOP = (f"while :; do if cat {TARGET_DIR}/f >/dev/null 2>&1; then r=allowed; else r=denied; fi; "
        "echo \"$r $(date +%s%N)\"; done")


def one_run(n: int) -> float:
    d = tempfile.mkdtemp(prefix="leash-reload-")
    with open(os.path.join(d, "bulk.cedar"), "w") as f:
        f.write(SYSTEM + policy_text(n, random.Random(n)))
    target = os.path.join(d, "target.cedar")
    with open(target, "w") as f:
        f.write(f'permit (principal, action == Action::"FileOpenReadOnly", resource in Dir::"{TARGET_DIR}/");\n')
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "leash", "--policy", d, "--agent", "bench",
                             "--", "/bin/bash", "-c", LOOP],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        while not lines.get(timeout=60).startswith("allowed"):
            pass
        time.sleep(0.5)
        written = time.time_ns()
        with open(target, "w") as f:
            f.write(f'forbid (principal, action == Action::"FileOpenReadOnly", resource in Dir::"{TARGET_DIR}/");\n')
        while True:
            result, stamp = lines.get(timeout=120).split()
            if result == "denied" and int(stamp) > written:
                return (int(stamp) - written) / 1e9
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(TARGET_DIR, exist_ok=True)
    with open(f"{TARGET_DIR}/f", "w") as f:
        f.write("x\n")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}")
    print("| policies | write -> enforced (median) | min | max |")
    print("|---:|---:|---:|---:|")
    for n in [int(x) for x in args.sizes.split(",")]:
        runs = [one_run(n) for _ in range(args.repeat)]
        print(f"| {n} | {statistics.median(runs) * 1000:.0f} ms | {min(runs) * 1000:.0f} ms "
              f"| {max(runs) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()

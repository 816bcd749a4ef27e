"""Compat backend benchmarks (issue 4), on the host, as root:

    sudo .venv/bin/python bench/compat_bench.py [--repeat 5]

open()+close(), connect() and execve() loops (bench/lsm_loops.c, the same
loops the lsm backend is measured with), and a getppid() loop (the cheapest
syscall: compat's syscall tracepoints put every task on the slower traced
syscall entry), for: no leash; Landlock with an
equivalent rule set (the in-kernel reference); leash compat running, process
out of scope; leash compat running, governed agent. Opens are measured on two
files: one every agent may read and write (after the first open the kernel
stops asking: a fanotify ignore mark) and one agents may only read (every
open goes to the userspace responder).

The build machines are noisy (the baseline drifts by tens of percent over a
minute), so each round measures every configuration back to back, starting
and stopping leash within the round; a ratio is the median over rounds of
(configuration / no leash) from the same round.

They are also VMs whose idle vCPUs halt: a wakeup across CPUs then costs tens
of microseconds, and a responder round trip is two of them. The "one CPU"
column runs the loop and every thread of the responder on CPU 0, which shows
the round trip without that cost (an idle host pays it, a busy one much
less).

Prints Markdown; bench/README.md keeps the latest figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from leash.audit import AuditLog  # noqa: E402
from leash.kernel import cgroup  # noqa: E402
from leash.kernel.compat import CompatBackend  # noqa: E402
from leash.policy.compiler import compile_tables  # noqa: E402
from leash.policy.loader import load_policy_dir  # noqa: E402

ROOT = "/tmp/compat-bench"
DEEP = "deep/er/still/file.txt"
POLICY = f"""
@id("read") permit (principal == Agent::"bench", action == Action::"FileOpenReadOnly", resource in Dir::"/");
@id("work") permit (principal == Agent::"bench", action in Action::"FileOpen", resource in Dir::"{ROOT}/w/");
@id("secret") forbid (principal, action in Action::"FileOpen", resource in Dir::"{ROOT}/w/secrets/");
@id("exec-usr") permit (principal, action == Action::"ProcessExec", resource in Dir::"/usr/");
@id("exec-bin") permit (principal, action == Action::"ProcessExec", resource in Dir::"{ROOT}/bin/");
@id("net") permit (principal, action == Action::"NetworkConnect", resource in Host::"127.0.0.1")
  when {{ context.port == 8080 }};
"""
# (loop, target, iterations)
CASES = {
    "open, file agents may read and write (kernel-cached)": ("open", f"{ROOT}/w/{DEEP}", 100000),
    "open, file agents may only read (asked every time)": ("open", f"{ROOT}/ro/{DEEP}", 20000),
    "connect (UDP, allowed port)": ("connect", "8080", 200000),
    "execve (posix_spawn + wait)": ("exec", f"{ROOT}/bin/true", 200),
    "getppid() (any cheap syscall)": ("getppid", "-", 2000000),
}
CONFIGS = ["no leash", "Landlock", "compat, out of scope", "compat, out of scope, one CPU",
           "compat, governed agent"]
SYSCALL_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv)
{
	long n = atol(argv[2]);
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""


def setup() -> str:
    shutil.rmtree(ROOT, ignore_errors=True)
    for d in ("w", "ro"):
        os.makedirs(f"{ROOT}/{d}/{os.path.dirname(DEEP)}")
        with open(f"{ROOT}/{d}/{DEEP}", "w") as f:
            f.write("x")
    os.makedirs(f"{ROOT}/w/secrets")
    os.makedirs(f"{ROOT}/bin")
    os.makedirs(f"{ROOT}/policy")
    shutil.copy("/usr/bin/true", f"{ROOT}/bin/true")
    with open(f"{ROOT}/policy/p.cedar", "w") as f:
        f.write(POLICY)
    with open(f"{ROOT}/policy/leash.toml", "w") as f:
        f.write("[agents.bench]\n")
    exe = f"{ROOT}/bin/lsm_loops"
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(REPO, "bench", "lsm_loops.c")], check=True)
    with open(f"{ROOT}/bin/getppid.c", "w") as f:
        f.write(SYSCALL_LOOP)
    subprocess.run(["cc", "-O2", "-o", f"{ROOT}/bin/getppid", f"{ROOT}/bin/getppid.c"], check=True)
    return exe


def measure(exe: str, case: str, cgroup_path: str | None, landlock: bool, cpu0: bool = False) -> float:
    """ns per iteration, one run."""
    what, target, n = CASES[case]
    cmd = ["taskset", "-c", "0"] if cpu0 else []
    cmd += [f"{ROOT}/bin/getppid", what, str(n)] if what == "getppid" else [exe, what, str(n), target]
    if landlock:
        cmd += ["--landlock", f"{ROOT}/w", f"{ROOT}/bin"]
    enter = f"echo $$ > {cgroup_path}/cgroup.procs && " if cgroup_path else ""
    out = subprocess.run(["/bin/sh", "-c", enter + "exec " + " ".join(cmd)], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def one_round(exe: str, tables) -> tuple[dict[str, dict[str, float]], tuple[int, int, int]]:
    r: dict[str, dict[str, float]] = {c: {} for c in CASES}
    for case in CASES:
        r[case]["no leash"] = measure(exe, case, None, False)
        r[case]["Landlock"] = measure(exe, case, None, True)
    log = AuditLog(f"{ROOT}/audit.jsonl", stderr=None)
    backend = CompatBackend()
    backend.start(tables, "enforce", log.write)
    cg = cgroup.create_agent_cgroup("bench", f"{os.getpid()}-{time.monotonic_ns()}")
    try:
        backend.govern(1, cg)
        for case in CASES:
            measure(exe, case, None, False)    # a real host is warm: cacheable files are cached
            r[case]["compat, out of scope"] = measure(exe, case, None, False)
            pin(backend.ready.pid, "0")
            r[case]["compat, out of scope, one CPU"] = measure(exe, case, None, False, cpu0=True)
            pin(backend.ready.pid, f"0-{os.cpu_count() - 1}")
            r[case]["compat, governed agent"] = measure(exe, case, cg, False)
        c = backend.stats()
        stats = (c.events, c.governed, c.ignore_marks)
    finally:
        cgroup.kill_all(cg)
        backend.stop()
        cgroup.remove_cgroup(cg)
        log.close()
    return r, stats


def pin(pid: int, cpus: str) -> None:
    """Every thread of `pid` onto `cpus`."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, kernel {platform.release()}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5, help="rounds")
    args = ap.parse_args()
    exe = setup()
    tables = compile_tables(load_policy_dir(f"{ROOT}/policy"), {"bench": 1})
    rounds = [one_round(exe, tables) for _ in range(args.repeat)]

    print(f"Machine: {machine()}; {args.repeat} rounds\n")
    print("| loop | no leash | " + " | ".join(CONFIGS[1:]) + " |")
    print("|---|" + "---:|" * len(CONFIGS))
    for case in CASES:
        base = statistics.median(r[case]["no leash"] for r, _ in rounds)
        cells = [f"{base / 1000:.2f} µs"]
        for c in CONFIGS[1:]:
            ratio = statistics.median(r[case][c] / r[case]["no leash"] for r, _ in rounds)
            absolute = statistics.median(r[case][c] for r, _ in rounds)
            cells.append(f"{ratio:.2f}x ({absolute / 1000:.2f} µs)")
        print(f"| {case} | " + " | ".join(cells) + " |")
    events, governed, marks = rounds[-1][1]
    print(f"\nLast round: {events} fanotify events answered ({governed} governed), "
          f"{marks} ignore marks placed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Policy core benchmarks (issue 2):

1. load + compile time and kernel table size for 10 / 100 / 1000 policies;
2. decisions per second answering from the compiled tables (what
   `explain --batch` does per line) vs. asking cedarpy per request, on the same
   requests, in the same run.

    python bench/policy_compile.py [--sizes 10,100,1000] [--requests 5000]

Prints a Markdown table; bench/README.md keeps the latest figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time

from leash.explain import ExplainRequest, explain
from leash.policy import requests as rq
from leash.policy.compiler import compile_tables
from leash.policy.loader import load_policy_dir
from leash.policy.tables import PROTOCOLS, TableIndex, kernel_entries

AGENTS = [f"agent{i}" for i in range(8)]


def policy_text(n: int, rnd: random.Random) -> str:
    """A realistic mix: per-agent workspaces, shared read-only trees, secrets
    forbids, tool dirs, blocked binaries, hosts/zones/ports and ranges."""
    out = []
    for i in range(n):
        kind = i % 6
        who = rnd.choice(["principal", f'principal == Agent::"{rnd.choice(AGENTS)}"',
                          'principal in AgentGroup::"coders"'])
        if kind == 0:
            out.append(f'permit({who}, action in Action::"FileOpen", resource in Dir::"/work/p{i}/");')
        elif kind == 1:
            out.append(f'forbid({who}, action == Action::"FileOpenReadWrite", '
                       f'resource in Dir::"/work/p{i - 1}/secrets/");')
        elif kind == 2:
            out.append(f'permit({who}, action == Action::"ProcessExec", resource) '
                       f'when {{ resource in [Dir::"/opt/tool{i}/bin/", Dir::"/usr/bin/"] }};')
        elif kind == 3:
            out.append(f'forbid({who}, action == Action::"ProcessExec", resource == File::"/usr/bin/t{i}");')
        elif kind == 4:
            out.append(f'permit({who}, action == Action::"NetworkConnect", resource in Host::"*.svc{i}.example") '
                       f'when {{ context.port == {443 + i % 7} }};')
        else:
            out.append(f'permit({who}, action == Action::"NetworkConnect", resource) '
                       f'when {{ context.ip.isInRange(ip("10.{i % 250}.{i // 250}.0/24")) && context.port < 1024 }};')
    return "\n".join(out) + "\n"


def write_dir(n: int, seed: int = 1) -> str:
    d = tempfile.mkdtemp(prefix=f"leash-bench-{n}-")
    with open(os.path.join(d, "bench.cedar"), "w") as f:
        f.write(policy_text(n, random.Random(seed)))
    with open(os.path.join(d, "leash.toml"), "w") as f:
        for a in AGENTS:
            f.write(f'[agents.{a}]\ngroups = ["{"coders" if a[-1] in "0246" else "ops"}"]\n')
    return d


def requests_for(n: int, count: int, rnd: random.Random) -> list[ExplainRequest]:
    out = []
    for _ in range(count):
        agent = rnd.choice(AGENTS + ["stranger"])
        r = rnd.random()
        if r < 0.5:
            action = rnd.choice(["FileOpenReadOnly", "FileOpenReadWrite"])
            p = rnd.randrange(n)
            path = rnd.choice([f"/work/p{p}/src/x.py", f"/work/p{p}/secrets/k", "/etc/passwd"])
            out.append(ExplainRequest(agent, action, path))
        elif r < 0.75:
            out.append(ExplainRequest(agent, "ProcessExec",
                                      rnd.choice(["/usr/bin/git", f"/usr/bin/t{rnd.randrange(n)}",
                                                  f"/opt/tool{rnd.randrange(n)}/bin/run"])))
        else:
            p = rnd.randrange(n)
            out.append(ExplainRequest(agent, "NetworkConnect",
                                      rnd.choice([f"api.svc{p}.example:{443 + p % 7}",
                                                  f"10.{p % 250}.{p // 250}.9:80", "192.0.2.1:443"])))
    return out


def cedar_request(policy, req: ExplainRequest) -> rq.Request:
    groups = policy.groups_of(req.agent)
    if req.action == "NetworkConnect":
        host, _, port = req.resource.rpartition(":")
        is_ip = host[0].isdigit()
        return rq.net_request(req.agent, groups, None if is_ip else host, host if is_ip else None,
                              int(port), "tcp")
    return rq.file_request(req.agent, groups, req.action, req.resource, False)


def bench_size(n: int, count: int) -> dict:
    d = write_dir(n)
    t0 = time.perf_counter()
    policy = load_policy_dir(d)
    t1 = time.perf_counter()
    tables = compile_tables(policy)
    t2 = time.perf_counter()
    entries = kernel_entries(tables, 0)
    size = sum(len(e.key) + len(e.value) for e in entries)
    index = TableIndex(tables)
    reqs = requests_for(n, count, random.Random(2))

    t3 = time.perf_counter()
    table_answers = [explain(index, r).decision for r in reqs]
    t4 = time.perf_counter()
    cedar_reqs = [cedar_request(policy, r) for r in reqs]
    t5 = time.perf_counter()
    cedar_answers = ["allow" if policy.decide(c).allow else "deny" for c in cedar_reqs]
    t6 = time.perf_counter()
    assert table_answers == cedar_answers, "tables and Cedar disagree"
    return {"n": n, "load_s": t1 - t0, "compile_s": t2 - t1, "cedar_requests": tables.cedar_requests,
            "entries": len(entries), "bytes": size,
            "tables_per_s": count / (t4 - t3), "cedar_per_s": count / (t6 - t5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, kernel {platform.release()}")
    print("| policies | load | compile | Cedar asks | kernel entries | table bytes "
          "| decisions/s tables | decisions/s cedarpy | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in args.sizes.split(",")]:
        runs = [bench_size(n, args.requests) for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {n} | {med['load_s'] * 1000:.0f} ms | {med['compile_s'] * 1000:.0f} ms "
              f"| {med['cedar_requests']:.0f} | {med['entries']:.0f} | {med['bytes'] / 1024:.0f} KiB "
              f"| {med['tables_per_s']:,.0f} | {med['cedar_per_s']:,.0f} "
              f"| {med['tables_per_s'] / med['cedar_per_s']:.0f}x |")


if __name__ == "__main__":
    main()

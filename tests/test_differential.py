"""Differential proof of the compiler: for random policy sets from the
supported fragment and random requests, the compiled tables' decision (and its
determining policies) equals cedarpy's decision on the same request built from
the DESIGN.md entity model.

Reproducing a failure: hypothesis prints `@reproduce_failure(...)` and the
falsifying example; see docs/testing.md.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from leash.policy import requests as rq
from leash.policy.compiler import AnswerCache, compile_tables
from leash.policy.loader import PolicyLoadError, load_policy_dir
from leash.policy.tables import CONNECT, EXEC, FILE_READ, FILE_WRITE, PROTOCOLS, TableIndex

AGENTS = ["alice", "bob", "carol"]
UNDECLARED = ["mallory"]
GROUPS = {"alice": ["devs"], "bob": ["devs", "ops"], "carol": []}
CONFIG = """
[agents.alice]
groups = ["devs"]
[agents.bob]
groups = ["devs", "ops"]
[agents.carol]
[groups.ops]
groups = ["staff"]
"""
DIRS = ["/", "/a/", "/a/b/", "/a/b/c/", "/etc/", "/x/"]
FILES = ["/a/f", "/a/b/g", "/etc/passwd", "/x", "/a/b"]
NAMES = ["api.example.com", "example.com", "b.api.example.com", "evil.com", "db"]
ZONES = ["*.example.com", "*.api.example.com", "*.com"]
IPS = ["10.0.0.1", "10.1.2.3", "192.168.1.1", "::1", "2001:db8::1", "127.0.0.1"]
CIDRS = ["10.0.0.0/8", "10.0.0.0/24", "192.168.0.0/16", "2001:db8::/32", "0.0.0.0/0", "::/0",
         "10.0.0.1/32", "::ffff:10.0.0.0/104"]
PORTS = [22, 80, 443, 5432, 1024, 0, 65535]

FILE_ACTIONS = [FILE_READ, FILE_WRITE, EXEC]
principal_scope = st.sampled_from(
    ["principal"] + [f'principal == Agent::"{a}"' for a in AGENTS + UNDECLARED]
    + ['principal in AgentGroup::"devs"', 'principal in AgentGroup::"ops"',
       'principal in AgentGroup::"staff"', "principal is Agent"])


def q(s: str) -> str:
    return '"' + s + '"'


# --- file-family policies ---------------------------------------------------
file_entity = st.one_of(st.sampled_from([f"Dir::{q(d)}" for d in DIRS]),
                        st.sampled_from([f"File::{q(f)}" for f in FILES]))
file_action_scope = st.one_of(
    st.just('action in Action::"FileOpen"'),
    st.just('action == Action::"FileOpen"'),                     # rewritten with a warning
    st.sampled_from([f'action == Action::"{a}"' for a in FILE_ACTIONS]),
    st.lists(st.sampled_from(FILE_ACTIONS), min_size=1, max_size=3, unique=True)
      .map(lambda xs: "action in [" + ", ".join(f'Action::"{a}"' for a in xs) + "]"))
file_resource_scope = st.one_of(
    st.just("resource"),
    st.sampled_from([f"resource in Dir::{q(d)}" for d in DIRS]),
    st.sampled_from([f"resource == File::{q(f)}" for f in FILES]),
    st.sampled_from([f"resource == Dir::{q(d)}" for d in DIRS]),
    st.sampled_from(["resource is File", "resource is Dir"]),
    st.sampled_from([f"resource is Dir in Dir::{q(d)}" for d in DIRS]))
file_atom = st.one_of(
    file_entity.map(lambda e: f"resource in {e}"),
    file_entity.map(lambda e: f"resource == {e}"),
    st.lists(file_entity, min_size=1, max_size=3).map(lambda es: "resource in [" + ", ".join(es) + "]"),
    st.sampled_from(["resource is File", "resource is Dir"]),
    st.sampled_from(['principal in AgentGroup::"devs"', 'principal == Agent::"carol"',
                     'principal == Agent::"mallory"', 'action == Action::"ProcessExec"', "true"]))

# --- network-family policies ------------------------------------------------
host_entity = st.one_of(
    st.sampled_from(NAMES + ZONES + IPS + ["*"]),
    st.tuples(st.sampled_from(NAMES + [i for i in IPS if ":" not in i]), st.sampled_from(PORTS))
      .map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.sampled_from([i for i in IPS if ":" in i]), st.sampled_from(PORTS))
      .map(lambda t: f"[{t[0]}]:{t[1]}")).map(lambda h: f"Host::{q(h)}")
net_atom = st.one_of(
    host_entity.map(lambda e: f"resource in {e}"),
    host_entity.map(lambda e: f"resource == {e}"),
    st.lists(host_entity, min_size=1, max_size=3).map(lambda es: "resource in [" + ", ".join(es) + "]"),
    st.tuples(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), st.sampled_from(PORTS))
      .map(lambda t: f"context.port {t[0]} {t[1]}"),
    st.sampled_from(['context.protocol == "tcp"', 'context.protocol == "udp"']),
    st.sampled_from(CIDRS).map(lambda c: f'context has ip && context.ip.isInRange(ip("{c}"))'),
    st.sampled_from(IPS).map(lambda i: f'context has ip && context.ip == ip("{i}")'),
    st.sampled_from(["isLoopback", "isIpv4", "isIpv6", "isMulticast"])
      .map(lambda f: f"context has ip && context.ip.{f}()"),
    st.sampled_from(NAMES).map(lambda n: f'context has hostname && context.hostname == "{n}"'),
    st.just("context has hostname"),
    st.sampled_from(['principal in AgentGroup::"ops"', 'principal == Agent::"alice"']))


def boolean(atom):
    return st.recursive(atom, lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda t: f"({t[0]} && {t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]} || {t[1]})"),
        inner.map(lambda e: f"!({e})"),
        st.tuples(inner, inner, inner).map(lambda t: f"(if {t[0]} then {t[1]} else {t[2]})")),
        max_leaves=4)


def policy(scope_action, scope_resource, atom):
    clauses = st.lists(st.tuples(st.sampled_from(["when", "unless"]), boolean(atom)), max_size=2)
    return st.tuples(st.sampled_from(["permit", "forbid"]), principal_scope, scope_action,
                     scope_resource, clauses).map(
        lambda t: f"{t[0]}({t[1]}, {t[2]}, {t[3]})"
                  + "".join(f" {k} {{ {e} }}" for k, e in t[4]) + ";")


file_policy = policy(file_action_scope, file_resource_scope, file_atom)
net_policy = policy(st.just('action == Action::"NetworkConnect"'),
                    st.one_of(st.just("resource"), host_entity.map(lambda e: f"resource in {e}"),
                              host_entity.map(lambda e: f"resource == {e}")), net_atom)
policy_sets = st.lists(st.one_of(file_policy, net_policy), min_size=1, max_size=6)

# --- requests -----------------------------------------------------------------
any_agent = st.sampled_from(AGENTS + UNDECLARED)
path = st.one_of(st.sampled_from(DIRS[1:] + FILES),
                 st.tuples(st.sampled_from(DIRS), st.sampled_from(["zz", "b", "c", "f", "passwd", "leash-class"]))
                   .map(lambda t: t[0] + t[1]),
                 st.sampled_from(["/etcx/y", "/a/bb", "/xy", "/a/b/c/d/e"]))
file_request = st.tuples(any_agent, st.sampled_from(FILE_ACTIONS), path, st.booleans())
port = st.one_of(st.sampled_from(PORTS), st.sampled_from(PORTS).map(lambda p: min(65535, p + 1)),
                 st.integers(0, 65535))
ip = st.one_of(st.sampled_from(IPS + ["10.0.0.2", "10.0.1.1", "11.0.0.1", "::ffff:10.0.0.1",
                                      "::ffff:192.168.1.1", "2001:db8::2", "fe80::1", "224.0.0.1"]),
               st.ip_addresses().map(str))
host = st.sampled_from(NAMES + ["x.example.com", "c.b.api.example.com", "other.org", "com",
                                "leash-class", "leash-class.example.com"])
net_request = st.tuples(any_agent, st.one_of(ip.map(lambda i: (None, i)), host.map(lambda h: (h, None))),
                        port, st.sampled_from(["tcp", "udp"]))


def load(texts: list[str]):
    d = tempfile.mkdtemp(prefix="leash-diff-")
    for i, t in enumerate(texts):
        with open(os.path.join(d, f"p{i}.cedar"), "w") as f:
            f.write(t + "\n")
    with open(os.path.join(d, "leash.toml"), "w") as f:
        f.write(CONFIG)
    try:
        return load_policy_dir(d)
    except PolicyLoadError:
        return None


def check(policy_obj, index, req, table_answer):
    cedar = policy_obj.decide(req)
    assert table_answer is not None, "tables have no answer"
    v = index.tables.verdicts[table_answer.verdict]
    ids = sorted(index.tables.policies[i].id for i in v.policies)
    assert (v.allow, ids) == (cedar.allow, sorted(cedar.policies)), (req, table_answer, cedar)


EXAMPLES = int(os.environ.get("LEASH_DIFF_EXAMPLES", "300"))
# Shared by every example, as the daemon shares one across reloads: answers
# from earlier policy sets must never leak into a later one's tables.
CACHE = AnswerCache()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(policy_sets, st.lists(file_request, min_size=1, max_size=25),
       st.lists(net_request, min_size=1, max_size=25))
def test_tables_agree_with_cedar(texts, file_reqs, net_reqs):
    policy_obj = load(texts)
    assume(policy_obj is not None)
    tables = compile_tables(policy_obj, {"alice": 1, "bob": 2}, CACHE)
    index = TableIndex(tables)
    for agent, action, p, is_dir in file_reqs:
        if not is_dir:
            p = p.rstrip("/")           # the kernel never reports a file path ending in /
        if (action == EXEC and is_dir) or not p:
            continue
        req = rq.file_request(agent, policy_obj.groups_of(agent), action, p, is_dir)
        check(policy_obj, index, req, index.path(index.agent_id(agent), action, p, is_dir))
    for agent, (hostname, addr), port_, proto in net_reqs:
        req = rq.net_request(agent, policy_obj.groups_of(agent), hostname, addr, port_, proto)
        aid = index.agent_id(agent)
        answer = (index.host(aid, hostname, port_, PROTOCOLS[proto]) if hostname
                  else index.address(aid, addr, port_, PROTOCOLS[proto]))
        check(policy_obj, index, req, answer)

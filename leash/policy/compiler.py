"""Compile a policy set into kernel decision tables (DESIGN.md section 1.2).

The request space of the kernel-enforced actions is cut into classes that
every policy condition treats alike:

- agents: one column per distinct set of mentioned principals an agent is
  (or is in); undeclared, unmentioned agents share the `other` column;
- paths: the longest distinguished prefix (a mentioned Dir) or an exact
  mentioned path names the class;
- network: the finest mentioned address range (or exact host name, or deepest
  mentioned zone) names a network class; within it, ports are cut into the
  intervals the policies' port atoms distinguish, for each protocol.

cedarpy is asked once per class, on a representative request built by
leash.policy.requests exactly as a real event would be. Policies whose scope
(or top-level `when` conjuncts on principal/resource/action) cannot match a
class are left out of the set Cedar evaluates for it: they could not be
satisfied, so the answer and its determining policies are unchanged. Where no
policy can match at all, the answer is Cedar's default deny.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections import defaultdict
from functools import partial

import cedarpy
import msgspec
from cedarpy import pst

from leash.policy import requests as rq
from leash.policy.fragment import PolicyAtoms, analyze
from leash.policy.loader import LoadedPolicy, split_host_port
from leash.policy.source import Diagnostic
from leash.policy.tables import (CONNECT, EXEC, FILE_READ, FILE_WRITE, PROTO_TCP, PROTO_UDP,
                                 AddrRule, DecisionTables, NameRule, NetClass, PathClass,
                                 PathRule, PortRule, Verdict)

OTHER_AGENT_ID = 0
MAX_AGENT_ID = (1 << 31) - 1
_FILE_ACTIONS = (FILE_READ, FILE_WRITE, EXEC)


class CompileError(Exception):
    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


# ---------------------------------------------------------------- applicability

class _Constraint(msgspec.Struct, frozen=True):
    """A top-level requirement of a policy (scope, or a `when` conjunct): the
    policy cannot be satisfied unless it holds."""
    var: str                           # "principal" | "resource" | "context"
    op: str                            # "in" | "eq" | "is" | "ip" | "has"
    entities: tuple = ()               # (type, id) uids; for "is": ((type, ""),)
    ranges: tuple = ()                 # "ip": (version, low, high) integer ranges
    attr: str = ""                     # "has": the context attribute


def _uid(e: pst.EntityUid) -> tuple[str, str]:
    return str(e.type), e.id


def _scope_constraints(var: str, c) -> list[_Constraint]:
    out = []
    if isinstance(c, pst.ScopeEq) and isinstance(c.entity, pst.EntityUid):
        out.append(_Constraint(var, "eq", (_uid(c.entity),)))
    elif isinstance(c, pst.ScopeIn) and isinstance(c.entity, pst.EntityUid):
        out.append(_Constraint(var, "in", (_uid(c.entity),)))
    elif isinstance(c, pst.ScopeIs):
        out.append(_Constraint(var, "is", ((str(c.entity_type), ""),)))
    elif isinstance(c, pst.ScopeIsIn) and isinstance(c.entity, pst.EntityUid):
        out.append(_Constraint(var, "is", ((str(c.entity_type), ""),)))
        out.append(_Constraint(var, "in", (_uid(c.entity),)))
    return out


def _conjuncts(expr) -> list:
    if isinstance(expr, pst.BinaryOp) and expr.op == "and":
        return _conjuncts(expr.left) + _conjuncts(expr.right)
    return [expr]


def _ip_range(node) -> tuple[int, int, int] | None:
    """Cedar's own reading of an ip("...") literal (no IPv4-mapped folding:
    Cedar never finds an IPv4 address inside an IPv6 range)."""
    if isinstance(node, pst.UnaryOp) and node.op == "ip" and isinstance(node.arg, pst.StringLit):
        try:
            net = ipaddress.ip_network(node.arg.value, strict=False)
        except ValueError:
            return None
        return net.version, int(net.network_address), int(net.broadcast_address)
    return None


def _condition_constraint(expr) -> _Constraint | None:
    if isinstance(expr, pst.HasAttr) and isinstance(expr.base, pst.Var) \
            and expr.base.name == "context" and len(expr.attrs) == 1:
        return _Constraint("context", "has", attr=expr.attrs[0])
    if not isinstance(expr, pst.BinaryOp):
        return None
    left, right = expr.left, expr.right
    is_ip = isinstance(left, pst.GetAttr) and left.attr == "ip" and isinstance(left.base, pst.Var) \
        and left.base.name == "context"
    if is_ip and expr.op in ("is_in_range", "eq") and _ip_range(right) is not None:
        return _Constraint("context", "ip", ranges=(_ip_range(right),))
    if expr.op not in ("in", "eq"):
        return None
    if expr.op == "eq" and isinstance(left, pst.EntityLit) and isinstance(right, pst.Var):
        left, right = right, left
    if not (isinstance(left, pst.Var) and left.name in ("principal", "resource")):
        return None
    items = right.elements if (expr.op == "in" and isinstance(right, pst.Set)) else (right,)
    if not items or not all(isinstance(i, pst.EntityLit) for i in items):
        return None
    return _Constraint(left.name, expr.op, tuple(_uid(i.value) for i in items))


class _Subject(msgspec.Struct, frozen=True):
    """What the filter knows about one side of a representative request."""
    uid: tuple[str, str]
    ancestors: frozenset               # uids it is `in`, itself included
    maybe: frozenset = frozenset()     # Host keys whose "key:port" uids it may be (port open)
    ip: tuple[int, int] | None = None  # (version, address) of a network class
    context: frozenset = frozenset()   # context attributes the request carries


def _holds(c: _Constraint, s: _Subject) -> bool:
    """False only when the constraint definitely fails for the subject."""
    if c.op == "has":
        return c.attr in s.context
    if c.op == "ip":                   # no ip: Cedar errors, the policy is not satisfied
        return s.ip is not None and any(v == s.ip[0] and lo <= s.ip[1] <= hi for v, lo, hi in c.ranges)
    if c.op == "is":
        return c.entities[0][0] == s.uid[0]
    for e in c.entities:
        if e != _anchor_key(e) and _anchor_key(e) in s.maybe:
            return True             # Host "x:port" while the class's port is open
        if c.op == "eq" and e == s.uid:
            return True
        if c.op == "in" and e in s.ancestors:
            return True
    return False


class _Candidate(msgspec.Struct):
    index: int
    actions: frozenset[str]
    constraints: tuple[_Constraint, ...]
    atoms: PolicyAtoms


def _candidate(index: int, template, atoms: PolicyAtoms) -> _Candidate:
    cons = _scope_constraints("principal", template.principal) + \
        _scope_constraints("resource", template.resource)
    for clause in template.clauses:
        if isinstance(clause, pst.When):
            for conj in _conjuncts(clause.expr):
                c = _condition_constraint(conj)
                if c is not None:
                    cons.append(c)
    return _Candidate(index, atoms.actions, tuple(cons), atoms)


class _Index:
    """The candidates of one action by the resource uids they are anchored
    to, so a class only looks at policies that name one of its ancestors;
    principal constraints are checked once per agent column (`for_column`)."""

    def __init__(self, candidates: list[_Candidate], action: str) -> None:
        self.unanchored: list[tuple[int, tuple]] = []
        self.by_anchor: dict[tuple[str, str], list[tuple[int, tuple]]] = defaultdict(list)
        self._principal: dict[int, tuple] = {}
        for c in candidates:
            if action not in c.actions:
                continue
            self._principal[c.index] = tuple(con for con in c.constraints if con.var == "principal")
            rest = tuple(con for con in c.constraints if con.var != "principal")
            anchors = [con for con in rest if con.var == "resource" and con.op in ("in", "eq")]
            if not anchors:
                self.unanchored.append((c.index, rest))
                continue
            best = min(anchors, key=lambda con: len(con.entities))
            for e in best.entities:
                self.by_anchor[_anchor_key(e)].append((c.index, rest))

    def for_column(self, principal: _Subject) -> frozenset[int]:
        """The candidates whose principal constraints this column meets."""
        return frozenset(i for i, cons in self._principal.items()
                         if all(_holds(con, principal) for con in cons))

    def applicable(self, resource: _Subject) -> tuple[int, ...]:
        seen: set[int] = set()
        out: list[int] = []
        pools = [self.unanchored] + [self.by_anchor.get(_anchor_key(a), ())
                                     for a in resource.ancestors | resource.maybe]
        for pool in pools:
            for index, constraints in pool:
                if index not in seen:
                    seen.add(index)
                    if all(_holds(con, resource) for con in constraints):
                        out.append(index)
        return tuple(sorted(out))


def _anchor_key(e: tuple[str, str]) -> tuple[str, str]:
    """Host "x:443" is indexed under "x", where a port-agnostic class finds it."""
    if e[0] == "Host":
        parsed = split_host_port(e[1])
        if not isinstance(parsed, str) and parsed[1] is not None:
            return "Host", parsed[0]
    return e


# ---------------------------------------------------------------- evaluation

class AnswerCache:
    """Cedar's answers, kept from one compile to the next: a reload usually
    changes a few policies, and a class that asks the same question of the
    same policies gets the same answer. Keys name the policies by a digest of
    their text (which carries their id), so a changed policy is a new key."""

    def __init__(self) -> None:
        self._previous: dict[tuple, tuple[bool, tuple[str, ...]]] = {}
        self._current: dict[tuple, tuple[bool, tuple[str, ...]]] = {}

    def get(self, key: tuple) -> tuple[bool, tuple[str, ...]] | None:
        answer = self._current.get(key) or self._previous.get(key)
        if answer is not None:
            self._current[key] = answer
        return answer

    def put(self, key: tuple, answer: tuple[bool, tuple[str, ...]]) -> None:
        self._current[key] = answer

    def rotate(self) -> None:
        """Forget what the compile that just ended did not ask."""
        self._previous, self._current = self._current, {}


class _Evaluator:
    """Collects representative requests, asks cedarpy (or the cache), interns
    verdicts."""

    def __init__(self, policy: LoadedPolicy, cache: AnswerCache) -> None:
        self.policy = policy
        self.cache = cache
        self.templates = [s.template for s in policy.sources]
        self.digests = [hashlib.sha256(s.text.encode()).hexdigest() for s in policy.sources]
        self._index_of_digest = {d: i for i, d in enumerate(self.digests)}
        # Everything besides the request that Cedar reads: the groups' graph.
        self._config_key = hashlib.sha256(msgspec.json.encode(policy.config.groups)).hexdigest()
        self._subset_keys: dict[tuple[int, ...], tuple[str, ...]] = {}
        self.verdicts: list[Verdict] = []
        self._verdict_ids: dict[Verdict, int] = {}
        self._pending: dict[tuple[int, ...], list[tuple[rq.Request, tuple, list, int]]] = defaultdict(list)
        self._hints: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._entities: dict[str, dict] = {}
        self.deny_none = self.intern(Verdict(False, ()))
        self.cedar_requests = 0

    def intern(self, v: Verdict) -> int:
        vid = self._verdict_ids.get(v)
        if vid is None:
            vid = self._verdict_ids[v] = len(self.verdicts)
            self.verdicts.append(v)
        return vid

    def ask(self, applicable: tuple[int, ...], make: partial, sink: list, slot: int,
            hint: tuple[int, ...] | None = None) -> None:
        """Arrange for sink[slot] to receive the verdict id for the request
        `make()` builds. `hint`: the policy subset of an enclosing class,
        likely contained in this one."""
        if not applicable:
            sink[slot] = self.deny_none
            return
        subset_key = self._subset_keys.get(applicable)
        if subset_key is None:
            subset_key = self._subset_keys[applicable] = tuple(self.digests[i] for i in applicable)
        key = (self._config_key, subset_key, make.func.__name__,
               tuple(tuple(a) if isinstance(a, list) else a for a in make.args))
        answer = self.cache.get(key)
        if answer is not None:
            allow, reasons = answer
            sink[slot] = self.intern(Verdict(allow, tuple(sorted(self._index_of_digest[d] for d in reasons))))
            return
        request = make()
        for e in request.entities:
            self._entities.setdefault(json.dumps(e["uid"], sort_keys=True), e)
        self._pending[applicable].append((request, key, sink, slot))
        if hint:
            self._hints.setdefault(applicable, hint)

    def _policy_set(self, subset: tuple[int, ...], built: dict) -> "cedarpy.PolicySet":
        """Building a PolicySet costs ~20 µs a policy; cloning one and adding a
        few policies costs ~0.2 ms. Classes nest, so most subsets are an
        enclosing class's subset plus a few policies."""
        hint = self._hints.get(subset)
        if hint in built and set(hint) <= set(subset):
            extra = sorted(set(subset) - set(hint))
            if not extra:
                return built[hint]
            if len(extra) < len(subset) // 2:
                return built[hint].with_added_str("\n".join(self.policy.sources[i].text for i in extra))
        return cedarpy.PolicySet.from_pst(pst.PolicySet(
            templates={}, static_policies={self.policy.sources[i].info.id: self.templates[i] for i in subset},
            template_links=()))

    def run(self) -> None:
        if self._pending:
            base = self.policy.entities_for(rq.Request({}, {}, {}, {}, []))
            ents = {json.dumps(e["uid"], sort_keys=True): e for e in base}
            ents.update(self._entities)
            handle = cedarpy.Entities.from_json_str(json.dumps(list(ents.values())))
        index_of = {s.info.id: i for i, s in enumerate(self.policy.sources)}
        built: dict[tuple[int, ...], cedarpy.PolicySet] = {}
        for subset, items in self._pending.items():
            policy_set = built[subset] = self._policy_set(subset, built)
            results = cedarpy.is_authorized_batch([r.cedar() for r, _, _, _ in items], policy_set, handle)
            self.cedar_requests += len(items)
            for (_, key, sink, slot), res in zip(items, results):
                # Policies added by with_added_str get positional ids; their
                # @id annotation (every policy text carries one) is ours.
                names = res.diagnostics.id_annotations_by_reason
                reasons = tuple(sorted(index_of[names.get(p, p)] for p in res.diagnostics.reasons))
                sink[slot] = self.intern(Verdict(res.allowed, reasons))
                self.cache.put(key, (res.allowed, tuple(self.digests[i] for i in reasons)))
        self._pending.clear()
        self.cache.rotate()


# ---------------------------------------------------------------- classes

def _unique_label(taken, make) -> str:
    n = 0
    while True:
        candidate = make("leash-class" + (f"-{n}" if n else ""))
        if candidate not in taken:
            return candidate
        n += 1


class _PathKey(msgspec.Struct, frozen=True):
    path: str                           # key text: "/a/" prefix, "/a/b" or "/a/" exact
    exact: bool
    kind: str                           # "File" | "Dir" for exact keys, "" for prefixes


def _path_keys(atoms: list[PolicyAtoms]) -> list[_PathKey]:
    prefixes = {"/"}
    exacts: set[tuple[str, str]] = set()
    for a in atoms:
        prefixes |= a.prefixes
        exacts |= a.exact_paths
    keys = [_PathKey(p, False, "") for p in sorted(prefixes)]
    keys += [_PathKey(path, True, kind) for kind, path in sorted(exacts)]
    return keys


def _enclosing_prefix(key: _PathKey, prefix_index: dict[str, int]) -> int | None:
    """The key of the nearest distinguished directory enclosing `key` (for an
    exact directory, its own prefix class)."""
    if key.exact and key.path in prefix_index:
        return prefix_index[key.path]
    path = key.path if key.exact else key.path[:-1]
    while path:
        path = path[:path.rfind("/", 0, len(path) - (1 if path.endswith("/") else 0)) + 1]
        if path in prefix_index and (key.exact or path != key.path):
            return prefix_index[path]
        if path == "/":
            break
    return None


def _file_subject(path: str, is_dir: bool) -> _Subject:
    res_uid, res_entity = rq.file_resource(path, is_dir)
    anc = frozenset([(res_uid["type"], res_uid["id"])] +
                    [(p["type"], p["id"]) for p in res_entity["parents"]])
    return _Subject((res_uid["type"], res_uid["id"]), anc)


def _ip_classes(cidrs: set[str]) -> list[tuple[str, str]]:
    """(cidr, representative address) for every range some address falls to
    as its finest mentioned range."""
    nets = sorted({ipaddress.ip_network(c) for c in cidrs} |
                  {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")},
                  key=lambda n: (n.version, n.network_address, n.prefixlen))
    out = []
    for net in nets:
        inside = [n for n in nets if n.version == net.version and n != net and n.subnet_of(net)]
        direct = [n for n in inside if not any(m != n and n.subnet_of(m) for m in inside)]
        candidate = int(net.network_address)
        for child in sorted(direct, key=lambda n: int(n.network_address)):
            if candidate < int(child.network_address):
                break
            candidate = max(candidate, int(child.broadcast_address) + 1)
        if candidate <= int(net.broadcast_address):
            out.append((str(net), str(ipaddress.ip_address(candidate) if net.version == 4
                                      else ipaddress.IPv6Address(candidate))))
    return out


def _port_intervals(cuts: set[int]) -> list[tuple[int, int]]:
    points = sorted({0} | {c for c in cuts if 0 < c <= 65535})
    return [(lo, (points[i + 1] - 1) if i + 1 < len(points) else 65535) for i, lo in enumerate(points)]


def _port_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] as disjoint aligned blocks: (start, prefix bits of 16)."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


# ---------------------------------------------------------------- compile

def _agent_ids(policy: LoadedPolicy, given: dict[str, int] | None, mentioned: set[str]) -> dict[str, int]:
    ids = dict(given or {})
    for name in list(policy.config.agents) + sorted(mentioned):
        if name not in ids:
            ids[name] = max([0, *ids.values()]) + 1
    if any(not 1 <= i <= MAX_AGENT_ID for i in ids.values()):
        raise ValueError("agent ids must be in 1..2^31-1")
    return ids


class _Column(msgspec.Struct):
    """Agents no policy can tell apart: one representative asks Cedar for all."""
    name: str
    groups: list[str]                  # the representative's direct groups
    agent_ids: list[int]


def _columns(policy: LoadedPolicy, ids: dict[str, int], principals: set) -> list[_Column]:
    """One column per distinct set of mentioned principals an agent is, or is in."""
    other_name = _unique_label(set(ids), lambda s: s)
    columns: dict[frozenset, _Column] = {}
    for name, aid in list(ids.items()) + [(other_name, OTHER_AGENT_ID)]:
        groups = policy.config.ancestor_groups(name)
        signature = frozenset(({("Agent", name)} | {("AgentGroup", g) for g in groups}) & principals)
        if signature not in columns:
            columns[signature] = _Column(name, policy.groups_of(name), [])
        columns[signature].agent_ids.append(aid)
    return list(columns.values())


class _Compilation:
    """One compile: classes, the questions for Cedar, then the table rows."""

    def __init__(self, policy: LoadedPolicy, candidates: list[_Candidate], ids: dict[str, int],
                 cache: AnswerCache) -> None:
        self.policy = policy
        self.ids = ids
        self.by_index = {c.index: c for c in candidates}
        self.atoms = [c.atoms for c in candidates]
        principals = set().union(*(a.principals for a in self.atoms))
        self.columns = _columns(policy, ids, principals)
        self.indexes = {a: _Index(candidates, a) for a in (FILE_READ, FILE_WRITE, EXEC, CONNECT)}
        self.column_ok = {}
        for ci, col in enumerate(self.columns):
            groups = policy.config.ancestor_groups(col.name)
            who = _Subject(("Agent", col.name),
                           frozenset({("Agent", col.name)} | {("AgentGroup", g) for g in groups}))
            for action, index in self.indexes.items():
                self.column_ok[(ci, action)] = index.for_column(who)
        self.ev = _Evaluator(policy, cache)
        self.type_sensitive = any(a.type_sensitive for a in self.atoms)

    def applicable(self, resource: _Subject, action: str) -> dict[int, tuple[int, ...]]:
        """Per column, the policies that may apply to this class."""
        found = self.indexes[action].applicable(resource)
        return {ci: tuple(i for i in found if i in self.column_ok[(ci, action)])
                for ci in range(len(self.columns))}

    # ------------------------------------------------------------ paths

    def ask_paths(self) -> None:
        """Per (column, path key): five verdict slots (read/write/exec file,
        read/write dir), filled when the evaluator runs."""
        self.keys = _path_keys(self.atoms)
        exact_set = {k.path for k in self.keys if k.exact}
        prefix_index = {k.path: i for i, k in enumerate(self.keys) if not k.exact}
        self.path_slots: dict[tuple[int, int], list[int]] = {}
        self.path_reps: dict[int, str] = {}
        subsets: dict[tuple, tuple[int, ...]] = {}   # (column, action, is_dir, key) -> policies
        for ki, key in enumerate(self.keys):
            if key.exact:
                reps = {key.kind == "Dir": key.path}
            else:
                child = _unique_label(exact_set, lambda s, k=key: k.path + s)
                reps = {False: child, True: child + "/"}
            self.path_reps[ki] = reps.get(False) or reps[True]
            parent = _enclosing_prefix(key, prefix_index)
            for ci in range(len(self.columns)):
                self.path_slots[(ci, ki)] = [-1] * 5
            for is_dir, path in reps.items():
                if is_dir and not key.exact and not self.type_sensitive:
                    continue            # no policy tells files from dirs: copied later
                rsub = _file_subject(path, is_dir)
                for action in (FILE_READ, FILE_WRITE) if is_dir else _FILE_ACTIONS:
                    slot = (3 if is_dir else 0) + _FILE_ACTIONS.index(action)
                    for ci, found in self.applicable(rsub, action).items():
                        col = self.columns[ci]
                        subsets[(ci, action, is_dir, ki)] = found
                        hint = subsets.get((ci, action, is_dir, parent)) or subsets.get((ci, action, False, parent))
                        self.ev.ask(found, partial(rq.file_request, col.name, col.groups, action, path, is_dir),
                                    self.path_slots[(ci, ki)], slot, hint)

    # ------------------------------------------------------------ network

    def ask_network(self) -> None:
        """Per (column, network class): the port intervals its policies
        distinguish, each with a verdict slot per protocol."""
        cidrs = set().union(*(a.cidrs for a in self.atoms))
        names = set().union(*(a.names for a in self.atoms))
        zones = set().union(*(a.zones for a in self.atoms))
        # (kind, key, host name asked about, address asked about); each
        # family's root class comes first, its policies a hint for the rest.
        self.net_keys: list[tuple[str, str, str | None, str | None]] = []
        for cidr, rep in _ip_classes(cidrs):
            self.net_keys.append(("addr", cidr, None, rep))
        self.net_keys.append(("name", "", _unique_label(names, lambda s: s), None))
        self.net_keys += [("name", n, n, None) for n in sorted(names)]
        self.net_keys += [("name", z, _unique_label(names, lambda s, z=z: f"{s}.{z[2:]}"), None)
                          for z in sorted(zones)]
        self.net_slots: dict[tuple[int, int], list[tuple[int, int, list[int]]]] = {}
        roots: dict[tuple[int, object], tuple[int, ...]] = {}
        for ni, (kind, key, host, ip) in enumerate(self.net_keys):
            addr = ipaddress.ip_address(ip) if ip else None
            family = addr.version if addr else "name"
            _, res_entity = rq.host_resource(host, ip, 0)
            anc = {(p["type"], p["id"]) for p in res_entity["parents"] if not p["id"].endswith(":0")}
            maybe = {("Host", key)} if kind == "name" and key and not key.startswith("*.") else set()
            if ip:
                maybe.add(("Host", ip))
            rsub = _Subject(("Host", "?"), frozenset(anc), frozenset(maybe),
                            ip=(addr.version, int(addr)) if addr else None,
                            context=frozenset(["port", "protocol", "ip" if ip else "hostname"]))
            for ci, found in self.applicable(rsub, CONNECT).items():
                col = self.columns[ci]
                hint = roots.setdefault((ci, family), found)
                cuts: set[int] = set()
                protocols = ["tcp"]
                for i in found:
                    cuts |= self.by_index[i].atoms.ports
                    if self.by_index[i].atoms.reads_protocol:
                        protocols = ["tcp", "udp"]   # else udp answers as tcp does
                intervals: list[tuple[int, int, list[int]]] = []
                for lo, hi in _port_intervals(cuts):
                    slots = [-1, -1]
                    for pi, proto in enumerate(protocols):
                        self.ev.ask(found, partial(rq.net_request, col.name, col.groups, host, ip, lo, proto),
                                    slots, pi, hint)
                    intervals.append((lo, hi, slots))
                self.net_slots[(ci, ni)] = intervals

    # ------------------------------------------------------------ rows

    def tables(self) -> DecisionTables:
        self.ev.run()
        t = DecisionTables(agents=dict(self.ids), other_agent=OTHER_AGENT_ID,
                           policies=self.policy.policies, verdicts=self.ev.verdicts, path_rules=[],
                           path_classes=[], addr_rules=[], name_rules=[], net_classes=[],
                           port_rules=[], cedar_requests=self.ev.cedar_requests)
        for (ci, ki), slots in self.path_slots.items():
            key = self.keys[ki]
            if not key.exact and not self.type_sensitive:
                slots[3], slots[4] = slots[0], slots[1]
            row = len(t.path_classes)
            t.path_classes.append(PathClass(*slots, representative=self.path_reps[ki]))
            t.path_rules += [PathRule(aid, key.path, key.exact, row) for aid in self.columns[ci].agent_ids]
        for (ci, ni), intervals in self.net_slots.items():
            kind, key, host, ip = self.net_keys[ni]
            row = len(t.net_classes)
            t.net_classes.append(NetClass(kind, host or ip or ""))
            for aid in self.columns[ci].agent_ids:
                if kind == "addr":
                    t.addr_rules.append(AddrRule(aid, key, row))
                else:
                    t.name_rules.append(NameRule(aid, key, row))
            for pi, proto in enumerate((PROTO_TCP, PROTO_UDP)):
                t.port_rules += _port_rules(row, proto, [(lo, hi, s[pi] if s[pi] != -1 else s[0])
                                                         for lo, hi, s in intervals])
        return t


def _port_rules(net_class: int, proto: int, intervals: list[tuple[int, int, int]]) -> list[PortRule]:
    """LPM entries: one /0 for the commonest verdict, then every interval
    with another verdict as disjoint aligned blocks, which out-match it."""
    spans: dict[int, int] = defaultdict(int)
    for lo, hi, v in intervals:
        spans[v] += hi - lo + 1
    default = max(spans, key=lambda v: (spans[v], -v))
    rules = [PortRule(net_class, proto, 0, 0, default)]
    for lo, hi, v in intervals:
        if v != default:
            rules += [PortRule(net_class, proto, start, bits, v) for start, bits in _port_blocks(lo, hi)]
    return rules


def compile_tables(policy: LoadedPolicy, agent_ids: dict[str, int] | None = None,
                   cache: AnswerCache | None = None) -> DecisionTables:
    """Raises CompileError naming file, line and construct for every policy the
    partition cannot capture. `cache`: answers kept from the previous compile
    (the daemon keeps one across reloads)."""
    diags: list[Diagnostic] = []
    candidates: list[_Candidate] = []
    for i, src in enumerate(policy.sources):
        atoms, errors = analyze(src.template)
        for err in errors:
            line, col = src.position_of(err.near)
            diags.append(Diagnostic(src.info.file, line, col, f"policy {src.info.id!r}: {err.message}"))
        if atoms is not None and not errors:
            candidates.append(_candidate(i, src.template, atoms))
    if diags:
        raise CompileError(diags)
    mentioned = {pid for c in candidates for kind, pid in c.atoms.principals if kind == "Agent"}
    job = _Compilation(policy, candidates, _agent_ids(policy, agent_ids, mentioned), cache or AnswerCache())
    job.ask_paths()
    job.ask_network()
    return job.tables()

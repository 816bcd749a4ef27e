"""Which Cedar constructs the kernel partition can capture, and the atoms each
policy contributes to it.

The compiler cuts the request space into classes that every policy treats
alike. That is only correct if every condition a policy can test is decided by
the class: which agent (column), which action, which distinguished path prefix
or exact path, which address range, host name or zone, which port interval and
protocol. This module checks each kernel-applicable policy against that
fragment (refusing anything else with the construct that caused it) and
collects its atoms.
"""

from __future__ import annotations

import ipaddress

import msgspec
from cedarpy import pst

from leash.policy.loader import applies_to, split_host_port
from leash.policy.tables import KERNEL_ACTIONS

CONTEXT_ATTRS = ("port", "protocol", "ip", "hostname")
# Cedar's ipaddr predicates are ranges in disguise.
PREDICATE_RANGES = {
    "is_loopback": ("127.0.0.0/8", "::1/128"),
    "is_multicast": ("224.0.0.0/4", "ff00::/8"),
    "is_ipv4": ("0.0.0.0/0",),
    "is_ipv6": ("::/0",),
}


class FragmentError(msgspec.Struct, frozen=True):
    message: str
    near: str                           # token text to point at in the source


class PolicyAtoms(msgspec.Struct):
    actions: frozenset[str]             # kernel actions the policy can apply to
    prefixes: set[str]                  # Dir ids: distinguished prefixes
    exact_paths: set[tuple[str, str]]   # (kind, path) compared with == : exact classes
    cidrs: set[str]                     # address ranges, canonical "a/n"
    names: set[str]                     # exact host names
    zones: set[str]                     # "*.zone" ids
    ports: set[int]                     # interval cut points (an interval starts at each)
    principals: set[tuple[str, str]]    # Agent / AgentGroup uids mentioned
    type_sensitive: bool = False        # tests `resource is File/Dir`
    reads_protocol: bool = False


def _is_var(node, name: str) -> bool:
    return isinstance(node, pst.Var) and node.name == name


def _context_attr(node) -> str | None:
    if isinstance(node, pst.GetAttr) and _is_var(node.base, "context"):
        return node.attr
    return None


def _free_vars(node) -> set[str]:
    from leash.policy.loader import walk
    return {n.name for n in walk(node) if isinstance(n, pst.Var)}


def _long(node) -> int | None:
    if isinstance(node, pst.LongLit):
        return node.value
    if isinstance(node, pst.UnaryOp) and node.op == "neg" and isinstance(node.arg, pst.LongLit):
        return -node.arg.value
    return None


def _ip_literal(node) -> str | None:
    if isinstance(node, pst.UnaryOp) and node.op == "ip" and isinstance(node.arg, pst.StringLit):
        return node.arg.value
    return None


def _canonical_cidr(text: str) -> str:
    """Raises ValueError for a malformed address or range."""
    net = ipaddress.ip_network(text, strict=False)
    if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        # ::ffff:a.b.c.d/n: connects to mapped addresses are asked about as IPv4
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return str(net)


class _Analyzer:
    def __init__(self, atoms: PolicyAtoms) -> None:
        self.atoms = atoms
        self.errors: list[FragmentError] = []

    def refuse(self, message: str, near: str) -> None:
        self.errors.append(FragmentError(message, near))

    def port_cut(self, op: str, value: int) -> None:
        # An interval starts at every value where the comparison's truth can flip.
        a = self.atoms.ports
        if op in ("eq", "not_eq"):
            a.update((value, value + 1))
        elif op in ("less", "greater_eq"):
            a.add(value)
        else:                           # less_eq, greater
            a.add(value + 1)

    def comparison(self, node: pst.BinaryOp) -> None:
        op = node.op
        left, right = node.left, node.right
        flipped = {"less": "greater", "less_eq": "greater_eq", "greater": "less", "greater_eq": "less_eq"}
        if _context_attr(right) and not _context_attr(left):
            left, right = right, left
            op = flipped.get(op, op)
        attr = _context_attr(left)
        if attr == "port" and _long(right) is not None:
            self.port_cut(op, _long(right))
            return
        if attr in ("protocol", "hostname") and op in ("eq", "not_eq") and isinstance(right, pst.StringLit):
            if attr == "protocol":
                self.atoms.reads_protocol = True
            else:
                self.atoms.names.add(right.value)
            return
        if attr == "ip" and op in ("eq", "not_eq") and _ip_literal(right) is not None:
            self.cidr(_ip_literal(right))
            return
        if op in ("eq", "not_eq") and (_is_var(left, "principal") or _is_var(left, "resource")
                                       or _is_var(left, "action")):
            if isinstance(right, pst.EntityLit):
                self.entity(right.value, exact=True)
                return
            if _is_var(right, "principal") or _is_var(right, "resource") or _is_var(right, "action"):
                return                  # variables of different entity types: constant
        self.refuse(f"comparison `{op}` on {self.describe(node.left)} and {self.describe(node.right)}",
                    self.near(node))

    def cidr(self, text: str) -> None:
        try:
            self.atoms.cidrs.add(_canonical_cidr(text))
        except ValueError:
            self.refuse(f"ip(\"{text}\") is not a valid address or range", text)

    def entity(self, e: pst.EntityUid, exact: bool) -> None:
        kind = str(e.type)
        if kind == "Dir":
            self.atoms.prefixes.add(e.id)
            if exact:
                self.atoms.exact_paths.add(("Dir", e.id))
        elif kind == "File":
            self.atoms.exact_paths.add(("File", e.id))
        elif kind == "Host":
            self.host(e.id)
        elif kind in ("Agent", "AgentGroup"):
            self.atoms.principals.add((kind, e.id))

    def host(self, hid: str) -> None:
        if hid == "*":
            return
        parsed = split_host_port(hid)
        if isinstance(parsed, str):
            return                      # the loader reported it
        host, port = parsed
        if port is not None:
            self.port_cut("eq", port)
        if host.startswith("*."):
            self.atoms.zones.add(host)
            return
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self.atoms.names.add(host)
            return
        self.cidr(host)

    def membership(self, node: pst.BinaryOp) -> None:
        if not (_is_var(node.left, "principal") or _is_var(node.left, "resource")
                or _is_var(node.left, "action")):
            self.refuse(f"`in` on {self.describe(node.left)}", self.near(node))
            return
        targets = node.right.elements if isinstance(node.right, pst.Set) else (node.right,)
        for t in targets:
            if isinstance(t, pst.EntityLit):
                self.entity(t.value, exact=False)
            else:
                self.refuse(f"`in` with {self.describe(t)} (only entity literals)", self.near(node))

    def boolean(self, node) -> None:
        """A boolean-valued expression in a condition."""
        if not (_free_vars(node) & {"principal", "resource", "context"}):
            return                      # closed (or action-only): constant per evaluated action
        if isinstance(node, pst.UnaryOp) and node.op == "not":
            self.boolean(node.arg)
        elif isinstance(node, pst.BinaryOp) and node.op in ("and", "or"):
            self.boolean(node.left)
            self.boolean(node.right)
        elif isinstance(node, pst.IfThenElse):
            self.boolean(node.cond)
            self.boolean(node.then_expr)
            self.boolean(node.else_expr)
        elif isinstance(node, pst.BinaryOp) and node.op in ("eq", "not_eq", "less", "less_eq",
                                                             "greater", "greater_eq"):
            self.comparison(node)
        elif isinstance(node, pst.BinaryOp) and node.op == "in":
            self.membership(node)
        elif isinstance(node, pst.BinaryOp) and node.op == "is_in_range" \
                and _context_attr(node.left) == "ip" and _ip_literal(node.right) is not None:
            self.cidr(_ip_literal(node.right))
        elif isinstance(node, pst.UnaryOp) and node.op in PREDICATE_RANGES \
                and _context_attr(node.arg) == "ip":
            for cidr in PREDICATE_RANGES[node.op]:
                self.cidr(cidr)
        elif isinstance(node, pst.Is) and (_is_var(node.base, "resource") or _is_var(node.base, "principal")):
            if _is_var(node.base, "resource"):
                self.atoms.type_sensitive = True
            if node.in_expr is not None:
                if isinstance(node.in_expr, pst.EntityLit):
                    self.entity(node.in_expr.value, exact=False)
                else:
                    self.refuse("`is ... in` with a non-literal", self.near(node))
        elif isinstance(node, pst.HasAttr) and _is_var(node.base, "context") \
                and all(a in CONTEXT_ATTRS for a in node.attrs[:1]):
            return                      # presence of hostname/ip is part of the class
        elif isinstance(node, pst.Like):
            self.refuse(f"`like` on {self.describe(node.base)} cannot be compiled into kernel tables "
                        "(use Dir::\"/prefix/\" for paths, Host::\"*.zone\" for host names)", "like")
        else:
            self.refuse(f"{self.describe(node)} cannot be compiled into kernel tables", self.near(node))

    def scope(self, constraint) -> None:
        if isinstance(constraint, (pst.ScopeEq, pst.ScopeIn, pst.ScopeIsIn)):
            e = constraint.entity
            if isinstance(e, pst.EntityUid):
                self.entity(e, exact=isinstance(constraint, pst.ScopeEq))
        if isinstance(constraint, (pst.ScopeIs, pst.ScopeIsIn)):
            return                      # caller marks type sensitivity for the resource

    @staticmethod
    def describe(node) -> str:
        if isinstance(node, pst.Var):
            return node.name
        if isinstance(node, pst.GetAttr):
            return f"{_Analyzer.describe(node.base)}.{node.attr}"
        if isinstance(node, pst.EntityLit):
            return str(node.value)
        if isinstance(node, (pst.StringLit, pst.LongLit, pst.BoolLit)):
            return repr(node.value)
        if isinstance(node, pst.BinaryOp):
            return f"`{node.op}` expression"
        if isinstance(node, pst.UnaryOp):
            return f"`{node.op}(...)`"
        return type(node).__name__

    @staticmethod
    def near(node) -> str:
        for n in (node.left, node.right) if isinstance(node, pst.BinaryOp) else (node,):
            if isinstance(n, pst.GetAttr):
                return n.attr
        return ""


def analyze(template) -> tuple[PolicyAtoms | None, list[FragmentError]]:
    """(atoms, errors) for a policy; atoms None when it applies to no kernel action."""
    actions = applies_to(template)
    kernel = frozenset(KERNEL_ACTIONS if actions is None else actions & set(KERNEL_ACTIONS))
    if not kernel:
        return None, []
    atoms = PolicyAtoms(kernel, set(), set(), set(), set(), set(), set(), set())
    an = _Analyzer(atoms)
    an.scope(template.principal)
    an.scope(template.resource)
    if isinstance(template.resource, (pst.ScopeIs, pst.ScopeIsIn)):
        atoms.type_sensitive = True
    for clause in template.clauses:
        an.boolean(clause.expr)
    return atoms, an.errors

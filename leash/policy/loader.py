"""Load a policy directory: every *.cedar file, the optional leash.toml, the
shipped schema. Parse, apply the documented vocabulary rewrites, check entity
ids, validate against the schema, and build one cedarpy PolicySet whose policy
ids are the ones users see in audit records.

Every problem becomes a Diagnostic with file, line, column and reason; load
reports all of them at once (PolicyLoadError) rather than stopping at the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
from importlib import resources

import cedarpy
import msgspec
from cedarpy import pst

from leash.policy.config import CONFIG_FILE, Config, ConfigError, parse_config
from leash.policy.requests import MCP_CALL, Request, action_entities, entity, uid
from leash.policy.source import (Diagnostic, LexError, LineIndex, Statement,
                                 locate_syntax_error, split_statements)
from leash.policy.tables import MAX_POLICY_PATH, PolicyInfo

_SCHEMA_ARGUMENTS_LINE = "arguments: {},"


class Decision(msgspec.Struct, frozen=True):
    allow: bool
    policies: list[str]                 # determining policy ids
    errors: list[str] = []              # Cedar evaluation errors (policies skipped)


class PolicyLoadError(Exception):
    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


class SourceToken(msgspec.Struct, frozen=True, array_like=True):
    text: str
    line: int
    column: int


class SourcePolicy(msgspec.Struct, frozen=True):
    """A parsed policy and where it came from."""
    info: PolicyInfo
    column: int
    template: object                    # cedarpy.pst.Template (rewritten, id set)
    text: str                           # Cedar text after rewrites, with @id
    tokens: tuple[SourceToken, ...]     # for pointing at a construct in errors

    def position_of(self, near: str) -> tuple[int, int]:
        """(line, column) of the first token spelled `near`, else of the policy."""
        for tok in self.tokens:
            if near and (tok.text == near or tok.text == f'"{near}"'):
                return tok.line, tok.column
        return self.info.line, self.column


def shipped_schema_text() -> str:
    return resources.files("leash.policy").joinpath("leash.cedarschema").read_text()


class LoadedPolicy:
    """A validated policy set plus the config it was loaded with."""

    def __init__(self, directory: str, config: Config, policies: list[SourcePolicy],
                 schema_text: str, warnings: list[Diagnostic], fingerprint: str) -> None:
        self.directory = directory
        self.config = config
        self.sources = policies
        self.policies = [p.info for p in policies]
        self.schema_text = schema_text
        self.warnings = warnings
        self.fingerprint = fingerprint
        self.policy_set = cedarpy.PolicySet.from_pst(pst.PolicySet(
            templates={}, static_policies={p.info.id: p.template for p in policies},
            template_links=()))
        self._fixed_entities = action_entities() + [
            entity("AgentGroup", g, [uid("AgentGroup", p) for p in cfg.groups])
            for g, cfg in config.groups.items()]
        self._fixed_json = ",".join(json.dumps(e) for e in self._fixed_entities)
        self._declared_groups = set(config.groups)

    def groups_of(self, agent: str) -> list[str]:
        """The agent's direct groups (undeclared agents have none)."""
        a = self.config.agents.get(agent)
        return list(a.groups) if a else []

    def _undeclared_groups(self, request: Request) -> list[dict]:
        """A group named only in an agent's entry is an entity with no parents."""
        names = {p["id"] for e in request.entities for p in e["parents"]
                 if p["type"] == "AgentGroup" and p["id"] not in self._declared_groups}
        return [entity("AgentGroup", g, []) for g in sorted(names)]

    def entities_for(self, request: Request) -> list[dict]:
        """Everything Cedar needs beside the request: actions, groups, the
        principal and resource with their parents."""
        return self._fixed_entities + self._undeclared_groups(request) + request.entities

    def _entities_json(self, request: Request) -> str:
        parts = [self._fixed_json] + [json.dumps(e) for e in self._undeclared_groups(request) + request.entities]
        return "[" + ",".join(parts) + "]"

    def decide(self, request: Request) -> Decision:
        """Cedar's answer for one request, straight from the policy set."""
        r = cedarpy.is_authorized(request.cedar(), self.policy_set, self._entities_json(request))
        return Decision(r.allowed, list(r.diagnostics.reasons),
                        [str(e) for e in r.diagnostics.errors])

    def decide_partial(self, request: Request, unknown: str) -> Decision:
        """Cedar's partial evaluation of `request` with `context[unknown]`
        left unknown. `allow` is False only when the request is refused
        whatever that value is (a residual that could still allow counts as
        allowed); `errors` are Cedar's evaluation errors. Raises whatever
        cedarpy raises (partial evaluation is an experimental cedarpy feature)."""
        partial = {
            "principal": _uid_text(request.principal),
            "action": _uid_text(request.action),
            "resource": _uid_text(request.resource),
            "context": dict(request.context, **{unknown: {"__extn": {"fn": "unknown", "arg": unknown}}}),
        }
        r = cedarpy.is_authorized_partial(partial, self.policy_set, self._entities_json(request))
        return Decision(r.decision != cedarpy.Decision.Deny, [], [str(e) for e in r.diagnostics.errors])


def _uid_text(u: dict) -> str:
    """An entity uid as Cedar text, the form partial requests take."""
    return f'{u["type"]}::{json.dumps(u["id"])}'


# ---------------------------------------------------------------- PST walking

def map_node(node, fn):
    """Rebuild a PST node bottom-up, replacing each node n by fn(n)."""
    if isinstance(node, tuple):
        return tuple(map_node(n, fn) for n in node)
    if isinstance(node, pst.FrozenMap) or (isinstance(node, dict) and not dataclasses.is_dataclass(node)):
        return pst.FrozenMap({k: map_node(v, fn) for k, v in node.items()})
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for f in dataclasses.fields(node):
            old = getattr(node, f.name)
            new = map_node(old, fn)
            if new is not old:
                changes[f.name] = new
        if changes:
            node = dataclasses.replace(node, **changes)
        return fn(node)
    return node


def walk(node):
    """Every PST node under `node`, pre-order."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, tuple):
            stack.extend(reversed(n))
        elif isinstance(n, dict):
            stack.extend(n.values())
        elif dataclasses.is_dataclass(n) and not isinstance(n, type):
            yield n
            stack.extend(reversed([getattr(n, f.name) for f in dataclasses.fields(n)]))


def applies_to(template) -> set[str] | None:
    """The actions a policy's scope admits (None: every action)."""
    a = template.action
    if isinstance(a, pst.ScopeAny):
        return None
    ents = (a.entity,) if isinstance(a, pst.ActionEq) else a.entities
    out: set[str] = set()
    for e in ents:
        out.add(e.id)
        out.update(child for child, parents in _ACTION_CHILDREN.items() if e.id in parents)
    return out


_ACTION_CHILDREN = {e["uid"]["id"]: [p["id"] for p in e["parents"]] for e in action_entities()}


# ---------------------------------------------------------------- checks on entity ids

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


def check_path(kind: str, path: str) -> str | None:
    """Why a File/Dir id cannot name a kernel path, or None."""
    if not path.startswith("/"):
        return f'{kind}::"{path}" is not an absolute path'
    if kind == "File" and path.endswith("/"):
        return f'File::"{path}" ends with "/": a directory is Dir::"{path}"'
    body = path.rstrip("/") if kind == "Dir" else path
    if "//" in path or any(part in (".", "..") for part in body.split("/")[1:]):
        return f'{kind}::"{path}" is not normalized (no "//", "." or ".." components)'
    if "\0" in path:
        return f'{kind}::"{path}" contains a NUL byte'
    if len(path.encode()) > MAX_POLICY_PATH + (1 if kind == "Dir" else 0):
        return (f'{kind}::"{path[:40]}..." is {len(path.encode())} bytes; the kernel key '
                f"holds paths up to {MAX_POLICY_PATH} bytes")
    return None


def split_host_port(text: str) -> tuple[str, int | None] | str:
    """'name:443' -> ('name', 443); '[::1]:22' -> ('::1', 22); 'name' -> ('name', None).
    Returns an error string when the port part is malformed."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1:].startswith(":"):
            return "a bracketed IPv6 address must be followed by :port"
        host, port_text = text[1:close], text[close + 2:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        return text, None              # a name, or an IPv6 address without a port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return f"port {port_text!r} is not a number from 0 to 65535"
    return host, int(port_text)


def check_host(hid: str) -> str | None:
    """Why a Host id can never match a request's Host entities, or None."""
    if hid == "*":
        return None
    if "/" in hid:
        return (f'Host::"{hid}" looks like a CIDR; Host ids are names, addresses and '
                f'"*.zone"s: write context.ip.isInRange(ip("{hid}"))')
    parsed = split_host_port(hid)
    if isinstance(parsed, str):
        return f'Host::"{hid}": {parsed}'
    host, port = parsed
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        if addr.version == 6 and addr.ipv4_mapped is not None:
            return f'Host::"{hid}": write the IPv4 address {addr.ipv4_mapped} (mapped addresses are asked about as IPv4)'
        if str(addr) != host:
            return f'Host::"{hid}": write the address in canonical form ({addr})'
        if addr.version == 6 and port is None and hid.startswith("["):
            return f'Host::"{hid}": brackets are only for [address]:port'
        return None
    if host.startswith("*."):
        if port is not None:
            return f'Host::"{hid}" never matches: zones carry no port; use context.port'
        host = host[2:]
    if not _HOSTNAME.match(host):
        return f'Host::"{hid}" is not a valid host name (lowercase letters, digits, "-", "_", dots)'
    return None


# ---------------------------------------------------------------- MCP argument types

def _literal_type(node) -> str | None:
    if isinstance(node, pst.StringLit):
        return "String"
    if isinstance(node, pst.LongLit) or (isinstance(node, pst.UnaryOp) and node.op == "neg"):
        return "Long"
    if isinstance(node, pst.BoolLit):
        return "Bool"
    if isinstance(node, pst.UnaryOp) and node.op in ("ip", "decimal"):
        return {"ip": "ipaddr", "decimal": "decimal"}[node.op]
    if isinstance(node, pst.Set) and node.elements:
        inner = _literal_type(node.elements[0])
        return f"Set<{inner}>" if inner else None
    return None


def _argument_path(node) -> tuple[str, ...] | None:
    """('a','b') for context.arguments.a.b, () for context.arguments."""
    attrs: list[str] = []
    while isinstance(node, pst.GetAttr):
        attrs.append(node.attr)
        node = node.base
    if isinstance(node, pst.Var) and node.name == "context" and attrs and attrs[-1] == "arguments":
        return tuple(reversed(attrs[:-1]))
    return None


def argument_types(templates: list) -> tuple[dict[tuple[str, ...], str], list[str]]:
    """Infer a Cedar type for every context.arguments.NAME the policies read,
    from what it is compared with. Returns (types, conflicts)."""
    types: dict[tuple[str, ...], str] = {}
    conflicts: list[str] = []

    def note(path, typ):
        if not path:
            return
        old = types.get(path)
        if old is None or old == "?":
            types[path] = typ
        elif typ != "?" and old != typ:
            conflicts.append(f"context.arguments.{'.'.join(path)} is used both as {old} and as {typ}")
        for i in range(1, len(path)):
            types.setdefault(path[:i], "{}")

    for t in templates:
        for n in walk(t):
            if isinstance(n, pst.BinaryOp):
                lp, rp = _argument_path(n.left), _argument_path(n.right)
                if n.op in ("eq", "not_eq", "less", "less_eq", "greater", "greater_eq"):
                    for p, other in ((lp, n.right), (rp, n.left)):
                        if p is not None:
                            note(p, _literal_type(other) or ("Long" if n.op not in ("eq", "not_eq") else "?"))
                elif n.op in ("contains",) and lp is not None:
                    inner = _literal_type(n.right)
                    note(lp, f"Set<{inner or 'String'}>")
                elif n.op in ("contains_all", "contains_any") and lp is not None:
                    note(lp, _literal_type(n.right) or "Set<String>")
                elif n.op == "is_in_range" and lp is not None:
                    note(lp, "ipaddr")
                else:
                    for p in (lp, rp):
                        if p:
                            note(p, "?")
            elif isinstance(n, pst.Like):
                p = _argument_path(n.base)
                if p is not None:
                    note(p, "String")
            elif isinstance(n, pst.HasAttr):
                p = _argument_path(n.base)
                if p is not None:
                    for i in range(len(n.attrs)):
                        note(p + n.attrs[:i + 1], "{}" if i + 1 < len(n.attrs) else "?")
            elif isinstance(n, pst.GetAttr):
                p = _argument_path(n)
                if p:
                    note(p, "?")
    return types, conflicts


def _record_text(types: dict[tuple[str, ...], str], prefix: tuple[str, ...]) -> str:
    members = []
    for path in sorted(p for p in types if len(p) == len(prefix) + 1 and p[:len(prefix)] == prefix):
        typ = types[path]
        has_children = any(len(p) > len(path) and p[:len(path)] == path for p in types)
        if has_children:
            typ = _record_text(types, path)
        elif typ in ("?", "{}"):
            typ = "String" if typ == "?" else "{}"
        members.append(f"{json.dumps(path[-1])}?: {typ}")
    return "{ " + ", ".join(members) + " }" if members else "{}"


def schema_with_arguments(types: dict[tuple[str, ...], str]) -> str:
    text = shipped_schema_text()
    return text.replace(_SCHEMA_ARGUMENTS_LINE, f"arguments: {_record_text(types, ())},", 1)


# ---------------------------------------------------------------- loading

def _read_text(path: str, name: str, diags: list[Diagnostic]) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        diags.append(Diagnostic(name, 0, 0, f"cannot read: {e.strerror}"))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        diags.append(Diagnostic(name, line, col, f"not UTF-8 (byte 0x{data[e.start]:02x})"))
        return None


class _FileContext:
    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.lines = LineIndex(text)

    def diag(self, offset: int, message: str, severity: str = "error") -> Diagnostic:
        line, col = self.lines.position(offset)
        return Diagnostic(self.name, line, col, message, severity)


def _find_string_token(stmt: Statement, value: str) -> int:
    for tok in stmt.tokens:
        if tok.text.startswith('"') and tok.text[1:-1] == value:
            return tok.start
    return stmt.start


def _find_token(stmt: Statement, text: str) -> int:
    for tok in stmt.tokens:
        if tok.text == text:
            return tok.start
    return stmt.start


def _rewrite(template, stmt: Statement, fc: _FileContext, diags: list[Diagnostic]):
    """The documented rewrites for the reference product's vocabulary."""
    file_open = pst.EntityUid(pst.EntityType("Action"), "FileOpen")

    def fix(node):
        if isinstance(node, pst.ActionEq) and node.entity == file_open:
            diags.append(fc.diag(_find_string_token(stmt, "FileOpen"),
                                 'action == Action::"FileOpen" matches no request under Cedar '
                                 '(FileOpen is a group); read as action in Action::"FileOpen"',
                                 "warning"))
            return pst.ActionIn((file_open,))
        if (isinstance(node, pst.BinaryOp) and node.op == "eq" and isinstance(node.left, pst.Var)
                and node.left.name == "action" and isinstance(node.right, pst.EntityLit)
                and node.right.value == file_open):
            diags.append(fc.diag(_find_string_token(stmt, "FileOpen"),
                                 'action == Action::"FileOpen" matches no request; read as '
                                 'action in Action::"FileOpen"', "warning"))
            return pst.BinaryOp("in", node.left, node.right)
        if isinstance(node, pst.EntityUid) and node.type == pst.EntityType("Dir") \
                and node.id.startswith("/") and not node.id.endswith("/"):
            diags.append(fc.diag(_find_string_token(stmt, node.id),
                                 f'Dir::"{node.id}" has no trailing "/"; read as Dir::"{node.id}/"',
                                 "warning"))
            return pst.EntityUid(node.type, node.id + "/")
        if isinstance(node, pst.EntityUid) and node.type == pst.EntityType("Host") \
                and node.id != node.id.lower():
            diags.append(fc.diag(_find_string_token(stmt, node.id),
                                 f'Host::"{node.id}": host names are compared in lowercase; '
                                 f'read as Host::"{node.id.lower()}"', "warning"))
            return pst.EntityUid(node.type, node.id.lower())
        return node

    return map_node(template, fix)


def _check_ids(template, stmt: Statement, fc: _FileContext, diags: list[Diagnostic]) -> None:
    for uid_ in pst.entity_uids(template):
        kind = str(uid_.type)
        why = None
        if kind in ("File", "Dir"):
            why = check_path(kind, uid_.id)
        elif kind == "Host":
            why = check_host(uid_.id)
        elif kind == "Action" and uid_.id not in _ACTION_CHILDREN:
            why = f'unknown action Action::"{uid_.id}" (leash knows {", ".join(sorted(_ACTION_CHILDREN))})'
        if why:
            diags.append(fc.diag(_find_string_token(stmt, uid_.id), why))


def cedar_string(value: str) -> str:
    """A Cedar string literal."""
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _policy_text(template) -> str:
    """Cedar text of one policy, always carrying @id with leash's id, so the
    id survives sets built from text (where Cedar numbers policies itself)."""
    text = str(cedarpy.PolicySet.from_pst(pst.PolicySet(
        templates={}, static_policies={template.id: template}, template_links=())))
    if "id" not in template.annotations:
        text = f"@id({cedar_string(template.id)})\n{text}"
    return text


def _parse_whole(text: str, statements: list[Statement]) -> list | None:
    """Every statement's policy from one parse of the file (the common, fast
    case), or None when the file needs statement-by-statement treatment:
    a syntax error, a template, or a statement the splitter saw differently."""
    if not statements or not all(s.terminated for s in statements):
        return None
    try:
        parsed = cedarpy.policies_to_pst(text)
    except ValueError:
        return None
    if parsed.templates or len(parsed.static_policies) != len(statements):
        return None
    return [parsed.static_policies[f"policy{i}"] for i in range(len(statements))]


def load_policy_dir(directory: str) -> LoadedPolicy:
    """Raises PolicyLoadError listing every problem found."""
    diags: list[Diagnostic] = []
    warnings: list[Diagnostic] = []
    if not os.path.exists(directory):
        raise PolicyLoadError([Diagnostic(directory, 0, 0, "no such directory")])
    if not os.path.isdir(directory):
        raise PolicyLoadError([Diagnostic(directory, 0, 0, "not a directory")])
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise PolicyLoadError([Diagnostic(directory, 0, 0, f"cannot list: {e.strerror}")]) from None
    cedar_files = [n for n in names if n.endswith(".cedar")]
    if not cedar_files:
        raise PolicyLoadError([Diagnostic(directory, 0, 0, "no *.cedar policy files in this directory")])

    digest = hashlib.sha256()
    config = Config()
    config_path = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(config_path):
        text = _read_text(config_path, CONFIG_FILE, diags)
        if text is not None:
            digest.update(text.encode())
            try:
                config = parse_config(text)
            except ConfigError as e:
                diags.append(Diagnostic(CONFIG_FILE, 0, 0, str(e)))

    sources: list[SourcePolicy] = []
    seen_ids: dict[str, str] = {}
    for name in cedar_files:
        text = _read_text(os.path.join(directory, name), name, diags)
        if text is None:
            continue
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        fc = _FileContext(name, text)
        try:
            statements = split_statements(name, text, fc.lines)
        except LexError as e:
            diags.append(fc.diag(e.offset, e.message))
            continue
        whole = _parse_whole(text, statements)
        for n, stmt in enumerate(statements):
            if whole is not None:
                template = whole[n]
            else:
                if not stmt.terminated:
                    off, msg = locate_syntax_error(text, stmt)
                    diags.append(fc.diag(off, msg if "end of input" not in msg else "policy does not end with `;`"))
                    continue
                try:
                    parsed = cedarpy.policies_to_pst(text[stmt.start:stmt.end])
                except ValueError:
                    off, msg = locate_syntax_error(text, stmt)
                    diags.append(fc.diag(off, msg))
                    continue
                if parsed.templates:
                    diags.append(fc.diag(stmt.start, "templates (?principal / ?resource slots) are not supported"))
                    continue
                (template,) = parsed.static_policies.values()
            pid = template.annotations.get("id") or f"{name}:{stmt.line}"
            if pid in seen_ids:
                diags.append(fc.diag(stmt.start, f"duplicate policy id {pid!r} (first at {seen_ids[pid]})"))
                continue
            seen_ids[pid] = f"{name}:{stmt.line}"
            template = dataclasses.replace(_rewrite(template, stmt, fc, warnings), id=pid)
            _check_ids(template, stmt, fc, diags)
            actions = applies_to(template)
            if actions is not None and "HttpRewrite" in actions:
                warnings.append(fc.diag(stmt.start, "Action::\"HttpRewrite\" is accepted but not enforced: "
                                        "leash does not rewrite HTTP traffic", "warning"))
            info = PolicyInfo(pid, name, stmt.line, template.effect)
            tokens = tuple(SourceToken(t.text, *fc.lines.position(t.start)) for t in stmt.tokens)
            sources.append(SourcePolicy(info, stmt.column, template, "", tokens))

    if not sources and not diags:
        diags.append(Diagnostic(directory, 0, 0, "no policies in the *.cedar files (an empty policy set "
                                "would refuse everything; write that as an explicit forbid)"))
    mcp_templates = [s.template for s in sources
                     if (a := applies_to(s.template)) is None or MCP_CALL in a]
    types, conflicts = argument_types(mcp_templates)
    schema_text = schema_with_arguments(types)
    for c in conflicts:
        diags.append(Diagnostic(directory, 0, 0, c))
    sources = [msgspec.structs.replace(s, text=_policy_text(s.template)) for s in sources]
    result = cedarpy.validate_policies("\n".join(s.text for s in sources), schema_text)
    for err in result.errors:
        m = re.match(r"policy(\d+)$", err.policy_id or "")
        message = re.sub(r"^for policy `policy\d+`, ", "", err.error)
        if m and int(m.group(1)) < len(sources):
            s = sources[int(m.group(1))]
            diags.append(Diagnostic(s.info.file, s.info.line, s.column, message))
        else:
            diags.append(Diagnostic(directory, 0, 0, message))
    if diags:
        raise PolicyLoadError(sorted(diags, key=lambda d: (d.file, d.line, d.column)))
    return LoadedPolicy(directory, config, sources, schema_text, warnings, digest.hexdigest())

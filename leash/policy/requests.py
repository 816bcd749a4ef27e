"""The entity model of DESIGN.md section 2: how an event becomes a Cedar
request. The compiler's representatives, `explain`, the compat slow path, the
MCP gateway and the differential tests all build requests here, so they ask
Cedar exactly the same question for the same event."""

from __future__ import annotations

import ipaddress
import math

import msgspec

from leash.policy.tables import CONNECT, EXEC, FILE_READ, FILE_WRITE

MCP_CALL = "McpCall"
ACTION_PARENTS: dict[str, list[str]] = {
    "FileOpen": [],
    FILE_READ: ["FileOpen"],
    FILE_WRITE: ["FileOpen"],
    EXEC: [],
    CONNECT: [],
    MCP_CALL: [],
    "HttpRewrite": [],
}


class Request(msgspec.Struct):
    principal: dict
    action: dict
    resource: dict
    context: dict
    entities: list[dict]               # principal and resource, with their parents

    def cedar(self) -> dict:
        return {"principal": self.principal, "action": self.action,
                "resource": self.resource, "context": self.context}


def uid(type_: str, id_: str) -> dict:
    return {"type": type_, "id": id_}


def entity(type_: str, id_: str, parents: list[dict]) -> dict:
    return {"uid": uid(type_, id_), "attrs": {}, "parents": parents}


def action_entities() -> list[dict]:
    return [entity("Action", a, [uid("Action", p) for p in ps]) for a, ps in ACTION_PARENTS.items()]


def agent_entity(agent: str, groups: list[str]) -> dict:
    return entity("Agent", agent, [uid("AgentGroup", g) for g in groups])


# ---------------------------------------------------------------- files

def dir_ancestors(path: str) -> list[str]:
    """Every Dir that contains `path` (itself excluded): '/a/b/c' and '/a/b/'
    both give ['/', '/a/'] plus '/a/b/' for the file."""
    body = path[:-1] if path.endswith("/") else path
    out = ["/"]
    i = body.find("/", 1)
    while i != -1:
        out.append(body[:i + 1])
        i = body.find("/", i + 1)
    return [d for d in out if d != path]


def file_resource(path: str, is_dir: bool) -> tuple[dict, dict]:
    """(resource uid, resource entity). A directory's id ends with '/'."""
    if is_dir and not path.endswith("/"):
        path += "/"
    kind = "Dir" if is_dir else "File"
    parents = [uid("Dir", d) for d in dir_ancestors(path)]
    return uid(kind, path), entity(kind, path, parents)


def file_request(agent: str, groups: list[str], action: str, path: str, is_dir: bool) -> Request:
    res_uid, res_entity = file_resource(path, is_dir)
    return Request(uid("Agent", agent), uid("Action", action), res_uid, {},
                   [agent_entity(agent, groups), res_entity])


# ---------------------------------------------------------------- network

def host_zones(name: str) -> list[str]:
    """'a.b.example.com' -> ['*.b.example.com', '*.example.com', '*.com']."""
    labels = name.split(".")
    return ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]


def ip_text(ip: str) -> str:
    """Canonical text; an IPv4-mapped IPv6 address is its IPv4 address
    (it reaches that IPv4 host, so that is what policy is asked about)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def ip_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def host_resource(host: str | None, ip: str | None, port: int) -> tuple[dict, dict]:
    rid = f"{host}:{port}" if host else ip_port(ip or "", port)
    parents: list[str] = []
    if host:
        parents.append(host)
        parents.extend(host_zones(host))
    if ip:
        parents.append(ip_port(ip, port))
        parents.append(ip)
    parents.append("*")
    return uid("Host", rid), entity("Host", rid, [uid("Host", p) for p in parents if p != rid])


def net_request(agent: str, groups: list[str], host: str | None, ip: str | None,
                port: int, protocol: str) -> Request:
    """`host` is a name learnt from DNS (lowercase, no trailing dot) or None;
    `ip` the destination address or None (only when asking about a name)."""
    if ip is not None:
        ip = ip_text(ip)
    res_uid, res_entity = host_resource(host, ip, port)
    context: dict = {"port": port, "protocol": protocol}
    if ip is not None:
        context["ip"] = {"__extn": {"fn": "ip", "arg": ip}}
    if host:
        context["hostname"] = host
    return Request(uid("Agent", agent), uid("Action", CONNECT), res_uid, context,
                   [agent_entity(agent, groups), res_entity])


# ---------------------------------------------------------------- MCP

class UnrepresentableArgument(ValueError):
    """An MCP argument that has no faithful Cedar value: the call is refused."""


_LONG_MIN, _LONG_MAX = -(2 ** 63), 2 ** 63 - 1


def cedar_value(value: object, where: str = "arguments") -> object:
    """JSON value -> Cedar JSON value. Strings, booleans, integers, lists (Sets)
    and objects (Records) map directly; a float becomes a `decimal` when it has
    at most four decimals (Cedar's decimal), otherwise it is refused; null
    members are left out (Cedar has no null), so `has` is false for them.
    An integral float (5.0) is a Long, as JSON Schema's "integer" says."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        if not _LONG_MIN <= value <= _LONG_MAX:
            raise UnrepresentableArgument(f"{where}: integer out of Cedar's Long range")
        return value
    if isinstance(value, float) and value.is_integer() and _LONG_MIN <= value <= _LONG_MAX:
        return int(value)              # JSON has one number type: 5.0 is the integer 5
    if isinstance(value, float):
        text = f"{value:.4f}"
        if not math.isfinite(value) or float(text) != value or abs(value) >= 922337203685477:
            raise UnrepresentableArgument(f"{where}: number {value!r} is not a Cedar decimal")
        return {"__extn": {"fn": "decimal", "arg": text}}
    if isinstance(value, list):
        return [cedar_value(v, f"{where}[{i}]") for i, v in enumerate(value) if v is not None]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("__"):
                # "__entity"/"__extn" keys would be read by Cedar as an entity
                # reference or extension value: a caller could forge one.
                raise UnrepresentableArgument(f"{where}: key {k!r} (keys starting with __ are reserved)")
            if v is not None:
                out[k] = cedar_value(v, f"{where}.{k}")
        return out
    if value is None:
        raise UnrepresentableArgument(f"{where}: null")
    raise UnrepresentableArgument(f"{where}: unsupported value {type(value).__name__}")


def mcp_request(agent: str, groups: list[str], server: str, tool: str, method: str,
                arguments: dict) -> Request:
    """Raises UnrepresentableArgument when an argument has no Cedar value."""
    res = uid("MCP::Tool", tool)
    context = {"server": server, "method": method, "arguments": cedar_value(arguments)}
    return Request(uid("Agent", agent), uid("Action", MCP_CALL), res, context,
                   [agent_entity(agent, groups), entity("MCP::Tool", tool, [uid("MCP::Server", server)])])

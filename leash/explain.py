"""`leash explain`: the decision the compiled tables give for one event, with
the determining policies and the class that matched. Answers come from the
same rows the kernel reads (TableIndex mirrors its longest-prefix lookups)."""

from __future__ import annotations

import ipaddress
import posixpath

import msgspec

from leash.policy.loader import check_host, split_host_port
from leash.policy.tables import EXEC, FILE_READ, FILE_WRITE, KERNEL_ACTIONS, PROTOCOLS, TableIndex


class ExplainRequest(msgspec.Struct, forbid_unknown_fields=True):
    agent: str
    action: str
    resource: str
    protocol: str = "tcp"


class PolicyRef(msgspec.Struct):
    id: str
    file: str
    line: int
    effect: str


class Explanation(msgspec.Struct, omit_defaults=True):
    agent: str
    action: str
    resource: str
    decision: str                      # "allow" | "deny"
    policies: list[str]
    table_class: str
    details: list[PolicyRef] = []


class ExplainError(ValueError):
    pass


def _path(resource: str) -> tuple[str, bool]:
    if not resource.startswith("/"):
        raise ExplainError(f"{resource!r}: file resources are absolute paths")
    is_dir = resource.endswith("/")
    path = posixpath.normpath(resource)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path, is_dir


def _endpoint(resource: str) -> tuple[str | None, str | None, int]:
    """(host name, ip, port) of 'name:port', 'ip:port' or '[v6]:port'."""
    parsed = split_host_port(resource)
    if isinstance(parsed, str) or parsed[1] is None:
        raise ExplainError(f"{resource!r}: network resources are host:port, ip:port or [ipv6]:port")
    host, port = parsed
    try:
        ipaddress.ip_address(host)
        return None, host, port
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    why = check_host(host)
    if why or host.startswith("*") or host == "":
        raise ExplainError(f"{resource!r}: not a host name")
    return host, None, port


def explain(index: TableIndex, req: ExplainRequest, with_details: bool = False) -> Explanation:
    if req.action not in KERNEL_ACTIONS:
        raise ExplainError(f"unknown action {req.action!r}: explain answers "
                           f"{', '.join(KERNEL_ACTIONS)} (MCP calls are decided by the gateway)")
    agent_id = index.agent_id(req.agent)
    resource = req.resource
    if req.action in (FILE_READ, FILE_WRITE, EXEC):
        path, is_dir = _path(req.resource)
        if is_dir and req.action == EXEC:
            raise ExplainError("ProcessExec takes a file, not a directory")
        answer = index.path(agent_id, req.action, path, is_dir)
        resource = path + ("/" if is_dir and path != "/" else "")
    else:
        if req.protocol not in PROTOCOLS:
            raise ExplainError(f"protocol {req.protocol!r}: tcp or udp")
        host, ip, port = _endpoint(req.resource)
        proto = PROTOCOLS[req.protocol]
        answer = (index.host(agent_id, host, port, proto) if host
                  else index.address(agent_id, ip, port, proto))
    if answer is None:                 # the kernel would fail closed
        return Explanation(req.agent, req.action, resource, "deny", [], "no table entry")
    verdict = index.tables.verdicts[answer.verdict]
    infos = [index.tables.policies[i] for i in verdict.policies]
    return Explanation(req.agent, req.action, resource, "allow" if verdict.allow else "deny",
                       [p.id for p in infos], answer.table_class,
                       [PolicyRef(p.id, p.file, p.line, p.effect) for p in infos] if with_details else [])


def human(e: Explanation) -> str:
    lines = [f"{e.decision.upper()}  {e.agent} {e.action} {e.resource}", f"  class: {e.table_class}"]
    if e.details:
        for p in e.details:
            lines.append(f"  {p.effect} {p.id} ({p.file}:{p.line})")
    elif e.decision == "deny":
        lines.append("  no permit matched (Cedar's default deny)")
    return "\n".join(lines)


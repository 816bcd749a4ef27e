"""`leash check`: load and compile a policy directory and summarise, per
action, what it does."""

from __future__ import annotations

import msgspec

from leash.policy.loader import LoadedPolicy, applies_to
from leash.policy.requests import MCP_CALL
from leash.policy.tables import (CONNECT, EXEC, FILE_READ, FILE_WRITE, KERNEL_ACTIONS,
                                 PROTO_TCP, DecisionTables, TableIndex)


class ActionSummary(msgspec.Struct):
    action: str
    permits: int
    forbids: int
    default: str                       # what an unmentioned resource gets, per agent
    classes: str                       # how the tables cut this action's resources


class CheckSummary(msgspec.Struct):
    directory: str
    files: int
    policies: int
    agents: list[str]
    warnings: list[str]
    actions: list[ActionSummary]
    cedar_requests: int


def _default(index: TableIndex, agent_names: list[str], decide) -> str:
    verdicts = {}
    for name in agent_names + [None]:
        aid = index.tables.other_agent if name is None else index.tables.agents[name]
        verdicts[name] = decide(aid)
    base = verdicts.pop(None)
    text = "allow" if base else "deny"
    exceptions = sorted(n for n, v in verdicts.items() if v != base)
    if exceptions:
        text += f" ({'allow' if not base else 'deny'} for {', '.join(exceptions)})"
    return text


def summarize(policy: LoadedPolicy, tables: DecisionTables) -> CheckSummary:
    index = TableIndex(tables)
    agents = sorted(tables.agents)
    actions = []
    path_keys = {(r.path, r.exact) for r in tables.path_rules}
    for action in KERNEL_ACTIONS + (MCP_CALL,):
        applying = [s for s in policy.sources
                    if (a := applies_to(s.template)) is None or action in a]
        permits = sum(1 for s in applying if s.template.effect == "permit")
        forbids = len(applying) - permits
        if action in (FILE_READ, FILE_WRITE, EXEC):
            def decide(aid, action=action):
                ans = index.path(aid, action, "/leash-unmentioned/file", False)
                return bool(ans and tables.verdicts[ans.verdict].allow)
            default = _default(index, agents, decide)
            classes = f"{len(path_keys)} path classes"
        elif action == CONNECT:
            def decide(aid):
                ans = index.address(aid, "192.0.2.1", 0, PROTO_TCP)
                return bool(ans and tables.verdicts[ans.verdict].allow)
            default = _default(index, agents, decide)
            classes = (f"{len({(r.cidr) for r in tables.addr_rules})} address ranges, "
                       f"{len({r.name for r in tables.name_rules})} host-name classes, "
                       f"{len(tables.port_rules)} port entries")
        else:
            default = "deny" if permits == 0 else "per call"
            classes = "decided per call by the MCP gateway"
        actions.append(ActionSummary(action, permits, forbids, default, classes))
    return CheckSummary(policy.directory, len({p.file for p in policy.policies}), len(policy.policies),
                        agents, [str(w) for w in policy.warnings], actions, tables.cedar_requests)


def human(s: CheckSummary) -> str:
    lines = [f"policy OK: {s.policies} policies in {s.files} file{'s' if s.files != 1 else ''} ({s.directory})",
             f"agents: {', '.join(s.agents) if s.agents else '(none declared)'}"]
    lines += [f"  {w}" for w in s.warnings]
    width = max(len(a.action) for a in s.actions)
    for a in s.actions:
        lines.append(f"{a.action:<{width}}  default {a.default}; {a.permits} permit, "
                     f"{a.forbids} forbid; {a.classes}")
    return "\n".join(lines)

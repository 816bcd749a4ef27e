"""Cedar decisions for MCP: may this agent call this tool with these
arguments, and which tools does a listing show.

A call is allowed iff Cedar says Allow, with one addition: when a `forbid`
policy cannot be evaluated for the call (a Cedar evaluation error, e.g. an
argument of another type than the policy compares it with), Cedar skips that
policy, which could let the call through; the gateway refuses the call
instead. Errors in `permit` policies keep Cedar's meaning (the permit does not
apply).

A listing shows a tool when some call to it could be allowed: Cedar's partial
evaluation with `context.arguments` unknown answers Deny only when the tool is
refused whatever the arguments. Listing is a courtesy; every call is decided
on its own arguments.
"""

from __future__ import annotations

import re
import time

import msgspec

from leash.policy.loader import LoadedPolicy
from leash.policy.requests import UnrepresentableArgument, mcp_request

_ERROR_POLICY = re.compile(r"policy `([^`]*)`")


class Verdict(msgspec.Struct, frozen=True):
    allow: bool
    policies: list[str]                # determining policy ids (or the forbids that failed)
    reason: str = ""                   # set when the answer is not a plain Cedar decision;
                                       # never holds argument values (it goes to the audit log)
    detail: str = ""                   # for the caller only: may quote argument values
    decide_us: int = 0


def decide_call(policy: LoadedPolicy, agent: str, server: str, tool: str,
                arguments: dict, method: str = "tools/call") -> Verdict:
    """The decision for one tool call."""
    start = time.perf_counter_ns()
    try:
        request = mcp_request(agent, policy.groups_of(agent), server, tool, method, arguments)
    except UnrepresentableArgument as e:
        return Verdict(False, [], "an argument has no Cedar value; refused", str(e), _since(start))
    decision = policy.decide(request)
    failed = failed_forbids(policy, decision.errors)
    if failed:
        return Verdict(False, failed, "a forbid policy could not be evaluated for this call; "
                       "refused (fail closed)", "; ".join(decision.errors), _since(start))
    return Verdict(decision.allow, list(decision.policies), decide_us=_since(start))


def failed_forbids(policy: LoadedPolicy, errors: list[str]) -> list[str]:
    """Ids of forbid policies among Cedar's evaluation errors. An error that
    names no known permit policy counts as a failed forbid."""
    effects = {p.id: p.effect for p in policy.policies}
    failed: list[str] = []
    for error in errors:
        named = [pid for pid in _ERROR_POLICY.findall(error) if pid in effects]
        if not named:
            failed.append("<unattributed Cedar error>")
        failed.extend(pid for pid in named if effects[pid] != "permit")
    return failed


class Listing:
    """Which tools a listing shows, cached per loaded policy (a listing does
    not depend on arguments, so the answer holds until the policy changes)."""

    def __init__(self, agent: str, server: str) -> None:
        self.agent = agent
        self.server = server
        self._policy: LoadedPolicy | None = None
        self._cache: dict[str, bool] = {}

    def visible(self, policy: LoadedPolicy, tool: str) -> bool:
        if policy is not self._policy:
            self._policy = policy
            self._cache = {}
        shown = self._cache.get(tool)
        if shown is None:
            shown = self._cache[tool] = may_allow(policy, self.agent, self.server, tool)
        return shown


def may_allow(policy: LoadedPolicy, agent: str, server: str, tool: str) -> bool:
    """False when every call to `tool` is refused, whatever its arguments."""
    request = mcp_request(agent, policy.groups_of(agent), server, tool, "tools/call", {})
    try:
        answer = policy.decide_partial(request, "arguments")
    except Exception:   # an experimental cedarpy feature: any failure hides the tool
        return False
    return answer.allow and not failed_forbids(policy, answer.errors)


def _since(start_ns: int) -> int:
    return (time.perf_counter_ns() - start_ns) // 1000



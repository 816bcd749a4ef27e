"""The gateway's protocol core, shared by the stdio wrapper and the HTTP proxy.

A `Session` sees every frame of one MCP session in both directions and says
what to forward and what to answer itself (`Routed`). It keeps the requests
each side is waiting on, so that every answer can be matched: a `tools/list`
result is filtered before the client sees it, each request gets one audit
record with its outcome, and an answer nobody asked for is dropped. The
transports own the bytes and the clocks that drive `expire`; nothing here does
I/O.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Union

import msgspec
from msgspec import UNSET

from leash.audit import AuditRecord, now_ns
from leash.mcp import jsonrpc, methods
from leash.mcp.decide import Listing, Verdict, decide_call
from leash.mcp.jsonrpc import Message, RequestId, WireError
from leash.policy.loader import LoadedPolicy

CLIENT, SERVER = "client", "server"
# How long an answered-by-leash request (timed out, cancelled) is remembered,
# so the server's late answer is swallowed quietly instead of reported.
_FORGET_AFTER_S = 600.0


class Settings(msgspec.Struct, frozen=True):
    agent: str
    server: str                          # the Cedar MCP::Server name
    transport: str                       # "stdio" | "http"
    mode: str = "enforce"                # "enforce" | "audit"
    timeout_s: float = 300.0             # per request; 0 waits forever
    max_message_bytes: int = 16 << 20
    extra_methods: frozenset[str] = frozenset()
    client_pid: int = 0                  # the MCP client process, when known
    client_uid: int = 0


class Routed(msgspec.Struct):
    """Frames to send on, each one message or one batch, in order."""
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    forwarded: list[RequestId] = []      # client requests now awaiting the server


class _Meta(msgspec.Struct):
    progressToken: Union[int, str, None] = None


class _NamedTool(msgspec.Struct):
    name: str


class _Call(msgspec.Struct):
    """A request one side sent that the other has not answered yet."""
    method: str
    resource: str                        # tool name for tools/call, else the method
    time_ns: int                         # wall clock at receipt (the record's time)
    started: float                       # monotonic, for latency and the deadline
    deadline: float
    verdict: Union[Verdict, None] = None
    arguments: Union[dict, None] = None  # as far as config lets them into the audit
    progress: Union[int, str, None] = None
    done: bool = False                   # already answered by leash; swallow a late answer


class Gateway:
    """What every session of one gateway shares: settings, the policy in
    force, the listing cache and the audit sink. A standalone gateway (wrap,
    proxy) has one; the daemon makes one per connection (each has its agent
    and server)."""

    def __init__(self, settings: Settings, policy: Callable[[], LoadedPolicy],
                 sink: Callable[[AuditRecord], None]) -> None:
        """`policy()` is asked before each decision for the policy in force."""
        self.settings = settings
        self.sink = sink
        self.listing = Listing(settings.agent, settings.server)
        self.client_requests = methods.CLIENT_REQUESTS | settings.extra_methods
        self.client_notifications = methods.CLIENT_NOTIFICATIONS | settings.extra_methods
        self.server_requests = methods.SERVER_REQUESTS | settings.extra_methods
        self.server_notifications = methods.SERVER_NOTIFICATIONS | settings.extra_methods
        self.policy = policy

    @property
    def enforce(self) -> bool:
        return self.settings.mode == "enforce"

    def session(self) -> "Session":
        return Session(self)

    def record(self, resource: str, decision: str, *, method: str, outcome: str,
               policies: list[str] | None = None, reason: str = "", time_ns: int = 0,
               **details: Any) -> None:
        s = self.settings
        extra = {"server": s.server, "transport": s.transport, "method": method, "outcome": outcome}
        extra.update((k, v) for k, v in details.items() if v is not None)
        self.sink(AuditRecord(time_ns=time_ns or now_ns(), agent=s.agent, action="McpCall",
                              resource=resource, decision=decision, policies=policies or [],
                              backend="mcp", mode=s.mode, pid=s.client_pid, uid=s.client_uid,
                              reason=reason, details=extra))

    def audit_arguments(self, policy: LoadedPolicy, arguments: dict) -> dict | None:
        """The arguments as far as `[mcp] record_arguments` lets them into the log."""
        allowed = policy.config.mcp.record_arguments
        if allowed is True:
            return arguments
        if not allowed:
            return None
        return {k: v for k, v in arguments.items() if k in allowed}


class Session:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.calls: dict[RequestId, _Call] = {}          # client -> server requests
        self.server_calls: dict[RequestId, _Call] = {}   # server -> client requests
        self._progress: dict[Union[int, str], RequestId] = {}

    # ------------------------------------------------------------ client -> server

    def from_client(self, data: bytes) -> Routed:
        routed = Routed()
        try:
            frame = jsonrpc.parse(data)
        except WireError as e:
            self._bad_frame(CLIENT, e, data, routed)
            return routed
        if self._audit_passes_broken_batch(CLIENT, frame, data, routed):
            return routed
        to_server: list[Message] = []
        to_client: list[Message] = []
        for item in frame.items:
            if isinstance(item, WireError):
                self._refuse(item.id, item.code, item.message, "-", "invalid", to_client)
                continue
            kind = jsonrpc.classify(item)
            if kind == jsonrpc.REQUEST:
                self._client_request(item, to_server, to_client, routed)
            elif kind == jsonrpc.NOTIFICATION:
                self._client_notification(item, to_server)
            else:
                self._client_answer(item, kind, to_server)
        _put(routed.to_server, to_server, frame.batch)
        _put(routed.to_client, to_client, frame.batch)
        return routed

    def _client_request(self, msg: Message, to_server: list[Message], to_client: list[Message],
                        routed: Routed) -> None:
        rid, method = msg.id, msg.method
        assert isinstance(rid, (int, str)) and isinstance(method, str)
        old = self.calls.get(rid)
        if old is not None and not old.done:
            # Refused in audit mode too: two requests under one id would make
            # every later answer ambiguous.
            self._refuse(rid, jsonrpc.INVALID_REQUEST,
                         f"request id {rid!r} is already in use by a pending request", method, "invalid",
                         to_client, force=True)
            return
        if method not in self.gw.client_requests:
            if self._refuse(rid, jsonrpc.METHOD_NOT_FOUND,
                            f"method {method!r} is not an MCP method leash lets through", method,
                            "unknown method", to_client):
                return
        params = _params(msg)
        call = _Call(method, method, now_ns(), time.monotonic(), self._deadline(),
                     progress=params.progress)
        if method == methods.TOOLS_CALL:
            if not self._tool_call(msg, call, to_client):
                return
        self.calls[rid] = call
        if call.progress is not None:
            self._progress[call.progress] = rid
        to_server.append(msg)
        routed.forwarded.append(rid)

    def _tool_call(self, msg: Message, call: _Call, to_client: list[Message]) -> bool:
        """Decide a tools/call; True when it goes on to the server. Rewrites
        the message's arguments from the decoded form the decision saw."""
        s = self.gw.settings
        params = msg.params
        try:
            if not isinstance(params, dict) or "name" not in params:
                raise ValueError
            tool = jsonrpc.decode_raw(params["name"], str)
            raw_args = params.get("arguments")
            arguments = {} if raw_args is None else jsonrpc.decode_raw(raw_args, Union[dict[str, Any], None])
        except (ValueError, msgspec.DecodeError):
            return not self._refuse(
                msg.id, jsonrpc.INVALID_PARAMS,
                "tools/call needs params.name (a string) and params.arguments (an object, if given)",
                methods.TOOLS_CALL, "invalid", to_client)
        arguments = arguments or {}
        # The policy in force is looked up per decision: an edit applies to the next call.
        policy = self.gw.policy()
        verdict = decide_call(policy, s.agent, s.server, tool, arguments)
        call.resource, call.verdict = tool, verdict
        call.arguments = self.gw.audit_arguments(policy, arguments)
        if not verdict.allow and self.gw.enforce:
            to_client.append(jsonrpc.error_reply(msg.id, jsonrpc.POLICY_REFUSED, _refusal(s, tool, verdict),
                                                 {"policies": verdict.policies, "agent": s.agent,
                                                  "server": s.server, "tool": tool}))
            self.gw.record(tool, "deny", method=methods.TOOLS_CALL, outcome="refused",
                           policies=verdict.policies, reason=verdict.reason, time_ns=call.time_ns,
                           id=msg.id, decide_us=verdict.decide_us, arguments=call.arguments)
            return False
        if raw_args is not None and arguments:
            params["arguments"] = jsonrpc.raw(arguments)
        return True

    def _client_notification(self, msg: Message, to_server: list[Message]) -> None:
        method = msg.method
        assert isinstance(method, str)
        if method not in self.gw.client_notifications:
            self.gw.record(method, "deny", method=method, outcome="dropped",
                           reason="notification of a method leash does not let through", direction=CLIENT)
            if self.gw.enforce:
                return
        if method == methods.CANCELLED:
            target = _params(msg).request_id
            call = self.calls.get(target) if target is not None else None
            if call is None or call.done:
                return        # the server never saw that request, or it is answered
            call.done = True
            self._finish(target, call, "cancelled", "cancelled by the client")
        to_server.append(msg)

    def _client_answer(self, msg: Message, kind: str, to_server: list[Message]) -> None:
        rid = msg.id
        call = self.server_calls.pop(rid, None) if isinstance(rid, (int, str)) else None
        if call is None:
            self.gw.record("-", "deny", method="-", outcome="dropped", id=rid, direction=CLIENT,
                           reason="the client answered a request the server never made")
            if self.gw.enforce:
                return
        else:
            self._finish_server_call(rid, call, kind, msg)
        to_server.append(msg)

    # ------------------------------------------------------------ server -> client

    def from_server(self, data: bytes) -> Routed:
        routed = Routed()
        try:
            frame = jsonrpc.parse(data)
        except WireError as e:
            self._bad_frame(SERVER, e, data, routed)
            return routed
        if self._audit_passes_broken_batch(SERVER, frame, data, routed):
            return routed
        to_client: list[Message] = []
        to_server: list[Message] = []
        for item in frame.items:
            if isinstance(item, WireError):
                self._server_garbage(item, to_client, to_server)
                continue
            kind = jsonrpc.classify(item)
            if kind in (jsonrpc.RESULT, jsonrpc.ERROR):
                self._server_answer(item, kind, to_client)
            elif kind == jsonrpc.REQUEST:
                self._server_request(item, to_client, to_server)
            else:
                self._server_notification(item, to_client)
        _put(routed.to_client, to_client, frame.batch)
        _put(routed.to_server, to_server, frame.batch)
        return routed

    def _server_answer(self, msg: Message, kind: str, to_client: list[Message]) -> None:
        rid = msg.id
        call = self.calls.pop(rid, None) if isinstance(rid, (int, str)) else None
        if call is None:
            self.gw.record("-", "deny", method="-", outcome="dropped", id=rid, direction=SERVER,
                           reason="the server answered a request the client never made")
            if self.gw.enforce:
                return
            to_client.append(msg)
            return
        self._progress.pop(call.progress, None)
        if call.done:
            return
        hidden = None
        if kind == jsonrpc.RESULT and call.method == methods.TOOLS_LIST:
            hidden = self._filter_listing(self.gw.policy(), msg)
            if hidden is None:
                to_client.append(jsonrpc.error_reply(rid, jsonrpc.UPSTREAM_FAILED,
                                                     "leash: the MCP server's tools/list result is not readable"))
                self._finish(rid, call, "server failed", "unreadable tools/list result")
                return
        self._finish(rid, call, _outcome(msg, kind), "", msg=msg, hidden=hidden)
        to_client.append(msg)

    def _filter_listing(self, policy: LoadedPolicy, msg: Message) -> list[str] | None:
        """Drop the tools this agent may never call from a tools/list result,
        in place. Returns the hidden names (None: the result is unreadable)."""
        result = msg.result
        assert isinstance(result, dict)
        try:
            entries = jsonrpc.decode_raw(result["tools"], list[msgspec.Raw])
            names = [jsonrpc.decode_raw(e, _NamedTool).name for e in entries]
        except (KeyError, msgspec.DecodeError):
            return None
        shown = [self.gw.listing.visible(policy, n) for n in names]
        hidden = [n for n, ok in zip(names, shown) if not ok]
        if hidden and self.gw.enforce:
            result["tools"] = jsonrpc.raw([e for e, ok in zip(entries, shown) if ok])
        return hidden

    def _server_request(self, msg: Message, to_client: list[Message], to_server: list[Message]) -> None:
        rid, method = msg.id, msg.method
        assert isinstance(rid, (int, str)) and isinstance(method, str)
        if method not in self.gw.server_requests:
            self.gw.record(method, "deny", method=method, outcome="unknown method", id=rid,
                           direction=SERVER, reason="server request of a method leash does not let through")
            if self.gw.enforce:
                to_server.append(jsonrpc.error_reply(
                    rid, jsonrpc.METHOD_NOT_FOUND, f"method {method!r} is not an MCP method leash lets through"))
                return
        elif rid in self.server_calls:
            self.gw.record(method, "deny", method=method, outcome="invalid", id=rid, direction=SERVER,
                           reason="request id already in use by a pending server request")
            to_server.append(jsonrpc.error_reply(rid, jsonrpc.INVALID_REQUEST,
                                                 f"request id {rid!r} is already in use"))
            return
        self.server_calls[rid] = _Call(method, method, now_ns(), time.monotonic(), 0.0)
        to_client.append(msg)

    def _server_notification(self, msg: Message, to_client: list[Message]) -> None:
        method = msg.method
        assert isinstance(method, str)
        if method not in self.gw.server_notifications:
            self.gw.record(method, "deny", method=method, outcome="dropped", direction=SERVER,
                           reason="notification of a method leash does not let through")
            if self.gw.enforce:
                return
        elif method == methods.PROGRESS:
            token = _params(msg).progressToken
            rid = self._progress.get(token) if token is not None else None
            call = self.calls.get(rid) if rid is not None else None
            if call is not None:
                call.deadline = self._deadline()
        elif method == methods.CANCELLED:
            target = _params(msg).request_id
            call = self.server_calls.pop(target, None) if target is not None else None
            if call is not None:
                self._finish_server_call(target, call, "cancelled", None)
        to_client.append(msg)

    def _server_garbage(self, error: WireError, to_client: list[Message], to_server: list[Message]) -> None:
        """An unusable message from the server. The server is told (an error
        without an id, as JSON-RPC answers an invalid message); if the message
        names a pending request, the client is told instead of being left
        waiting."""
        to_server.append(jsonrpc.error_reply(None, error.code, "leash: invalid message from the MCP server: "
                                             + error.message))
        call = self.calls.pop(error.id, None) if error.id is not None else None
        if call is not None and not call.done:
            to_client.append(jsonrpc.error_reply(error.id, jsonrpc.UPSTREAM_FAILED,
                                                 "leash: the MCP server sent an invalid answer: " + error.message))
            self._finish(error.id, call, "server failed", "invalid answer from the server: " + error.message)
        else:
            self.gw.record("-", "deny", method="-", outcome="dropped", direction=SERVER,
                           reason="invalid message from the server: " + error.message)

    # ------------------------------------------------------------ both directions

    def _bad_frame(self, side: str, error: WireError, data: bytes, routed: Routed) -> None:
        if not self.gw.enforce:
            self.gw.record("-", "deny", method="-", outcome="forwarded unparsed", direction=side,
                           reason=f"invalid message from the {side}: {error.message}")
            (routed.to_server if side == CLIENT else routed.to_client).append(data)
            return
        out: list[Message] = []
        if side == CLIENT:
            self._refuse(error.id, error.code, error.message, "-", "invalid", out)
        else:
            back: list[Message] = []
            self._server_garbage(error, out, back)
            _put(routed.to_server, back, False)
        _put(routed.to_client, out, False)

    def _audit_passes_broken_batch(self, side: str, frame: jsonrpc.Frame, data: bytes, routed: Routed) -> bool:
        """Audit mode forwards a batch with invalid elements untouched, as it
        does an unparsable frame (its valid elements go unchecked)."""
        broken = [item for item in frame.items if isinstance(item, WireError)]
        if self.gw.enforce or not broken:
            return False
        self._bad_frame(side, broken[0], data, routed)
        return True

    def oversized(self, side: str, prefix: bytes) -> Routed:
        """A message over the size limit, known only by its first bytes. It is
        never forwarded, in any mode: the limit is a resource bound."""
        limit = self.gw.settings.max_message_bytes
        routed = Routed()
        error = WireError(jsonrpc.INVALID_REQUEST, f"message exceeds the {limit}-byte limit",
                          jsonrpc.salvage_id(prefix))
        out: list[Message] = []
        if side == CLIENT:
            self._refuse(error.id, error.code, error.message, "-", "invalid", out, force=True)
        else:
            back: list[Message] = []
            self._server_garbage(error, out, back)
            _put(routed.to_server, back, False)
        _put(routed.to_client, out, False)
        return routed

    def _refuse(self, rid: RequestId | None, code: int, message: str, resource: str, outcome: str,
                to_client: list[Message], force: bool = False) -> bool:
        """Answer a client request with an error and record it. In audit mode
        only the record is written (and False returned) unless `force`."""
        self.gw.record(resource, "deny", method=resource, outcome=outcome, id=rid, direction=CLIENT,
                       reason=f"invalid message from the client: {message}" if outcome == "invalid" else message)
        if not (self.gw.enforce or force):
            return False
        # An error naming the id of a pending request would look like its
        # answer; the client gets the error without an id instead.
        pending = rid is not None and rid in self.calls and not self.calls[rid].done
        to_client.append(jsonrpc.error_reply(None if pending else rid, code, f"leash: {message}"))
        return True

    def expire(self, now: float | None = None, ids: list[RequestId] | None = None) -> Routed:
        """Answer the requests whose deadline passed (all, or those in `ids`)
        with a timeout error, and tell the server they are cancelled."""
        now = time.monotonic() if now is None else now
        routed = Routed()
        timeout = self.gw.settings.timeout_s
        for rid, call in list(self.calls.items()):
            if call.done:
                if now - call.started > _FORGET_AFTER_S:
                    del self.calls[rid]
                continue
            if call.deadline > now or (ids is not None and rid not in ids):
                continue
            call.done = True
            routed.to_client.append(jsonrpc.encode(jsonrpc.error_reply(
                rid, jsonrpc.UPSTREAM_TIMEOUT,
                f"leash: the MCP server did not answer {call.method} within {timeout:g} s")))
            routed.to_server.append(jsonrpc.encode(jsonrpc.notification(
                methods.CANCELLED, {"requestId": rid, "reason": "timed out at the leash gateway"})))
            self._finish(rid, call, "timeout", f"no answer within {timeout:g} s")
        return routed

    def next_deadline(self, ids: list[RequestId] | None = None) -> float | None:
        """The earliest deadline among pending requests (all, or those in `ids`)."""
        calls = self.calls.values() if ids is None else [self.calls[i] for i in ids if i in self.calls]
        pending = [c.deadline for c in calls if not c.done and c.deadline < float("inf")]
        return min(pending) if pending else None

    def fail(self, ids: list[RequestId] | None, message: str, code: int = jsonrpc.UPSTREAM_FAILED,
             prefix: str = "leash: ") -> Routed:
        """The server cannot answer (it exited, the connection broke, it
        rejected the whole exchange): every pending request (or those in
        `ids`) gets an error now."""
        routed = Routed()
        for rid in list(self.calls) if ids is None else ids:
            call = self.calls.pop(rid, None)
            if call is None or call.done:
                continue
            routed.to_client.append(jsonrpc.encode(jsonrpc.error_reply(rid, code, prefix + message)))
            self._finish(rid, call, "server failed", message)
        if ids is None:
            self._drop_server_calls("server gone")
        return routed

    def abandon(self, ids: list[RequestId] | None, message: str) -> None:
        """The client is gone: record what it was still waiting for."""
        for rid in list(self.calls) if ids is None else ids:
            call = self.calls.pop(rid, None)
            if call is not None and not call.done:
                self._finish(rid, call, "client gone", message)
        if ids is None:
            self._drop_server_calls("client gone")

    def pending(self, ids: list[RequestId]) -> list[RequestId]:
        return [rid for rid in ids if rid in self.calls and not self.calls[rid].done]

    def _drop_server_calls(self, outcome: str) -> None:
        for rid, call in list(self.server_calls.items()):
            self._finish_server_call(rid, call, outcome, None)
        self.server_calls.clear()

    # ------------------------------------------------------------ records

    def _deadline(self) -> float:
        timeout = self.gw.settings.timeout_s
        return time.monotonic() + timeout if timeout > 0 else float("inf")

    def _finish(self, rid: RequestId, call: _Call, outcome: str, reason: str,
                msg: Message | None = None, hidden: list[str] | None = None) -> None:
        """The one audit record of a client request that reached the server."""
        v = call.verdict
        decision = "deny" if v is not None and not v.allow else "allow"
        latency_us = int((time.monotonic() - call.started) * 1e6)
        error_code = msg.error.code if msg is not None and msg.error is not UNSET else None
        if hidden and not self.gw.enforce:
            reason = "audit mode: listing not filtered"
        self.gw.record(call.resource, decision, method=call.method, outcome=outcome,
                       policies=v.policies if v is not None else None,
                       reason=reason or (v.reason if v is not None else ""),
                       time_ns=call.time_ns, id=rid, decide_us=v.decide_us if v is not None else None,
                       latency_us=latency_us, error_code=error_code, hidden=hidden or None,
                       arguments=call.arguments)

    def _finish_server_call(self, rid: RequestId, call: _Call, kind_or_outcome: str,
                            msg: Message | None) -> None:
        outcome = _outcome(msg, kind_or_outcome) if msg is not None else kind_or_outcome
        self.gw.record(call.method, "allow", method=call.method, outcome=outcome, time_ns=call.time_ns,
                       id=rid, direction=SERVER, latency_us=int((time.monotonic() - call.started) * 1e6))


def _put(out: list[bytes], messages: list[Message], batch: bool) -> None:
    frame = jsonrpc.encode_frame(messages, batch)
    if frame is not None:
        out.append(frame)


def _params(msg: Message) -> "_ReadParams":
    """progressToken/requestId from a message's params (absent when unreadable)."""
    p = msg.params
    if not isinstance(p, dict):
        return _ReadParams()
    out = _ReadParams()
    try:
        if "_meta" in p:
            meta = jsonrpc.decode_raw(p["_meta"], Union[_Meta, None])
            out.progress = meta.progressToken if meta is not None else None
        if "requestId" in p:
            out.request_id = jsonrpc.decode_raw(p["requestId"], Union[int, str])
        if "progressToken" in p:
            out.progressToken = jsonrpc.decode_raw(p["progressToken"], Union[int, str])
    except msgspec.DecodeError:
        pass
    return out


class _ReadParams(msgspec.Struct):
    progress: Union[int, str, None] = None          # params._meta.progressToken
    request_id: Union[int, str, None] = None        # params.requestId (cancellation)
    progressToken: Union[int, str, None] = None     # params.progressToken (progress)


def _outcome(msg: Message | None, kind: str) -> str:
    if msg is None:
        return kind
    if kind == jsonrpc.ERROR:
        return "error"
    result = msg.result
    if isinstance(result, dict) and bytes(result.get("isError", b"false")).strip() == b"true":
        return "tool error"
    return "result"


def _refusal(s: Settings, tool: str, v: Verdict) -> str:
    head = f'leash: tools/call "{tool}" on server "{s.server}" refused'
    if v.reason:
        return f"{head}: {v.reason}" + (f" ({v.detail})" if v.detail else "")
    if v.policies:
        return f"{head} by policy {', '.join(v.policies)}"
    return f"{head}: no policy permits it (default deny)"

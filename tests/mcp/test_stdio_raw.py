"""`leash mcp wrap` at the protocol level: JSON lines written straight to the
wrapper, a scripted server behind it (tests/mcp/fake_stdio_server.py) that
logs every line it receives and misbehaves on request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leash.mcp import jsonrpc
from tests.mcp.helpers import (ENV, FAKE_SERVER, LinePeer, gateway_args, records, request, tool_call,
                               write_policy)

POLICY = """\
@id("most-tools")
permit(principal, action == Action::"McpCall", resource)
unless { resource == MCP::Tool::"write_file" };

@id("no-delete")
forbid(principal, action, resource == MCP::Tool::"delete_file");

@id("limit")
forbid(principal, action, resource == MCP::Tool::"echo")
when { context.arguments has n && context.arguments.n > 10 };
"""


class Wrapped:
    def __init__(self, tmp: Path, *options: str, cedar: str = POLICY, toml: str | None = None) -> None:
        self.policy = write_policy(tmp / "policy", cedar, toml)
        self.audit = tmp / "audit.jsonl"
        self.server_log = tmp / "server.log"
        self.peer = LinePeer(gateway_args(self.policy, self.audit, "wrap", *options, "--",
                                          sys.executable, str(FAKE_SERVER), str(self.server_log)))

    def call(self, message: dict) -> dict:
        return self.peer.call(message)

    def server_saw(self) -> list[object]:
        if not self.server_log.exists():
            return []
        return [json.loads(line) for line in self.server_log.read_bytes().splitlines() if line.strip()]

    def records(self):
        return records(self.audit)


@pytest.fixture
def wrapped(tmp_path):
    opened: list[Wrapped] = []

    def open_(*options: str, **kw) -> Wrapped:
        w = Wrapped(tmp_path, *options, **kw)
        opened.append(w)
        return w

    yield open_
    for w in opened:
        w.peer.stop()


def error_of(answer: dict) -> tuple[object, int, str]:
    return answer["id"], answer["error"]["code"], answer["error"]["message"]


def text_of(answer: dict) -> str:
    return answer["result"]["content"][0]["text"]


def names_called(w: Wrapped) -> list[str]:
    return [m["params"]["name"] for m in w.server_saw() if isinstance(m, dict) and m.get("method") == "tools/call"]


def test_refused_call_never_reaches_the_server(wrapped):
    w = wrapped()
    rid, code, message = error_of(w.call(tool_call(1, "delete_file", {"path": "/w/a"})))
    assert (rid, code) == (1, jsonrpc.POLICY_REFUSED)
    assert message == 'leash: tools/call "delete_file" on server "files" refused by policy no-delete'
    rid, code, message = error_of(w.call(tool_call(2, "write_file", {})))
    assert (rid, code) == (2, jsonrpc.POLICY_REFUSED) and "default deny" in message
    assert text_of(w.call(tool_call(3, "echo", {"text": "hi"}))) == 'called echo with {"text": "hi"}'
    assert names_called(w) == ["echo"]


def test_each_listing_page_is_filtered(wrapped):
    w = wrapped()
    first = w.call(request(1, "tools/list"))
    assert [t["name"] for t in first["result"]["tools"]] == ["echo"]
    assert first["result"]["nextCursor"] == "p2"
    second = w.call(request(2, "tools/list", {"cursor": "p2"}))
    assert [t["name"] for t in second["result"]["tools"]] == ["read_file"]
    hidden = [r.details["hidden"] for r in w.records() if r.resource == "tools/list"]
    assert hidden == [["delete_file"], ["write_file"]]


def test_invalid_json_gets_a_parse_error(wrapped):
    w = wrapped()
    assert error_of(w.call(b'{"jsonrpc":"2.0","id":7,"method":"tools/list",')) == (
        7, jsonrpc.PARSE_ERROR, "leash: parse error: Input data was truncated")
    w.peer.send(b"\xff\xfe not even utf-8")
    assert error_of(w.peer.recv())[:2] == (None, jsonrpc.PARSE_ERROR)
    assert text_of(w.call(tool_call(8, "echo", {}))) == "called echo with {}"
    assert [m["id"] for m in w.server_saw()] == [8]
    assert [r.details["outcome"] for r in w.records()][:2] == ["invalid", "invalid"]


def test_wrong_jsonrpc_version_and_malformed_envelopes(wrapped):
    w = wrapped()
    assert error_of(w.call({"jsonrpc": "1.0", "id": 5, "method": "tools/list"}))[:2] == (5, jsonrpc.INVALID_REQUEST)
    assert error_of(w.call({"jsonrpc": "2.0", "id": True, "method": "tools/list"}))[:2] == (
        None, jsonrpc.INVALID_REQUEST)
    assert error_of(w.call({"jsonrpc": "2.0", "id": 6, "method": "x", "result": {}}))[:2] == (
        6, jsonrpc.INVALID_REQUEST)
    assert error_of(w.call(b"42"))[:2] == (None, jsonrpc.INVALID_REQUEST)
    assert w.server_saw() == []


def test_unknown_methods_are_refused(wrapped):
    w = wrapped()
    rid, code, message = error_of(w.call(request(1, "Tools/Call", {"name": "delete_file"})))
    assert (rid, code) == (1, jsonrpc.METHOD_NOT_FOUND) and message.startswith("leash:")
    w.peer.send({"jsonrpc": "2.0", "method": "notifications/made_up"})
    w.peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert text_of(w.call(tool_call(2, "echo", {}))).startswith("called echo")
    assert [m.get("method") for m in w.server_saw()] == ["notifications/initialized", "tools/call"]


def test_extension_methods_can_be_let_through(wrapped):
    w = wrapped("--allow-method", "x/custom")
    assert w.call(request(1, "x/custom")) == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_batch_elements_are_decided_one_by_one(wrapped):
    w = wrapped()
    w.peer.send([tool_call(10, "echo", {}), tool_call(11, "delete_file", {}),
                 {"jsonrpc": "2.0", "method": "notifications/initialized"}, 5])
    answers = [w.peer.recv(), w.peer.recv()]
    refused = next(a for a in answers if any("error" in m for m in a))
    forwarded = next(a for a in answers if a is not refused)
    assert sorted(((m["id"], m["error"]["code"]) for m in refused), key=str) == [
        (11, jsonrpc.POLICY_REFUSED), (None, jsonrpc.INVALID_REQUEST)]
    assert forwarded == [{"jsonrpc": "2.0", "id": 10, "result": {"batched": "tools/call"}}]
    (batch,) = w.server_saw()
    assert [m.get("id") for m in batch] == [10, None]
    assert error_of(w.call([]))[:2] == (None, jsonrpc.INVALID_REQUEST)


def test_the_server_parses_what_was_decided(wrapped):
    """Duplicate keys: the gateway reads the last one, as the SDKs do, and
    forwards a re-encoded message, so no parser can read it differently."""
    w = wrapped()
    dup_name = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_file"}}'
    assert error_of(w.call(dup_name))[:2] == (1, jsonrpc.POLICY_REFUSED)
    dup_method = b'{"jsonrpc":"2.0","id":2,"method":"tools/list","method":"tools/call","params":{"name":"delete_file"}}'
    assert error_of(w.call(dup_method))[:2] == (2, jsonrpc.POLICY_REFUSED)
    dup_arg = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{"n":50,"n":5}}}'
    assert text_of(w.call(dup_arg)) == 'called echo with {"n": 5}'
    (line,) = w.server_log.read_bytes().splitlines()
    assert b'"n":50' not in line and names_called(w) == ["echo"]


@pytest.mark.parametrize("arguments, allowed, why", [
    ({"n": 5}, True, ""),
    ({"n": None}, True, ""),                          # null: the argument is absent
    ({"n": 50}, False, "refused by policy limit"),
    ({"n": "fifty"}, False, "could not be evaluated"),  # forbid errors: fail closed
    ({"n": 12.5}, False, "could not be evaluated"),   # a decimal where the forbid compares a Long
    ({"n": 1.23456}, False, "no Cedar value"),        # beyond decimal's four places
    ({"n": 2 ** 70}, False, "no Cedar value"),
    ({"x": {"__entity": {"type": "Agent", "id": "root"}}}, False, "no Cedar value"),
])
def test_argument_values(wrapped, arguments, allowed, why):
    w = wrapped()
    answer = w.call(tool_call(1, "echo", arguments))
    if allowed:
        assert "result" in answer
        return
    rid, code, message = error_of(answer)
    assert (rid, code) == (1, jsonrpc.POLICY_REFUSED) and why in message
    (rec,) = [r for r in w.records() if r.resource == "echo"]
    assert rec.decision == "deny"
    assert "fifty" not in rec.reason and "1.23456" not in rec.reason, "argument values stay out of the log"
    if why == "could not be evaluated":
        assert rec.policies == ["limit"]


def test_malformed_tool_call_params(wrapped):
    w = wrapped()
    assert error_of(w.call(request(1, "tools/call", {"name": 5})))[:2] == (1, jsonrpc.INVALID_PARAMS)
    assert error_of(w.call(request(2, "tools/call", {"name": "echo", "arguments": [1]})))[:2] == (
        2, jsonrpc.INVALID_PARAMS)
    assert error_of(w.call(request(3, "tools/call")))[:2] == (3, jsonrpc.INVALID_PARAMS)


def test_notifications_from_the_server(wrapped):
    w = wrapped()
    w.peer.send(tool_call(1, "notify", {}))
    assert w.peer.recv()["method"] == "notifications/message"        # notifications/weird is dropped
    assert text_of(w.peer.recv()) == "notified"
    assert any(r.resource == "notifications/weird" and r.details["outcome"] == "dropped" for r in w.records())


def test_server_to_client_requests(wrapped):
    w = wrapped()
    w.peer.send(tool_call(1, "ask", {}))
    asked = w.peer.recv()                       # x/unknown was answered by leash, not shown to the client
    assert (asked["id"], asked["method"]) == ("s1", "roots/list")
    w.peer.send({"jsonrpc": "2.0", "id": "nobody-asked", "result": {}})
    w.peer.send({"jsonrpc": "2.0", "id": "s1", "result": {"roots": []}})
    assert text_of(w.peer.recv()) == 'roots: {"roots": []}'
    saw = w.server_saw()
    refused = next(m for m in saw if m.get("id") == "s0")
    assert refused["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert not any(m.get("id") == "nobody-asked" for m in saw)


def test_cancellation_and_late_answers(wrapped):
    w = wrapped()
    w.peer.send(tool_call(20, "stubborn", {}))
    w.peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 20}})
    w.peer.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 999}})
    # The server answers the cancelled call anyway; that answer is swallowed,
    # so the next message the client sees is the echo's.
    assert w.call(tool_call(21, "echo", {}))["id"] == 21
    assert [m.get("params", {}).get("requestId") for m in w.server_saw()
            if m.get("method") == "notifications/cancelled"] == [20]
    (rec,) = [r for r in w.records() if r.resource == "stubborn"]
    assert rec.details["outcome"] == "cancelled"


def test_a_pending_id_cannot_be_reused(wrapped):
    w = wrapped()
    w.peer.send(tool_call(30, "hang", {}))
    assert error_of(w.call(tool_call(30, "echo", {})))[:2] == (None, jsonrpc.INVALID_REQUEST)


def test_oversized_messages(wrapped):
    w = wrapped("--max-message-bytes", "4096")
    assert error_of(w.call(tool_call(40, "echo", {"text": "x" * 10000})))[:2] == (40, jsonrpc.INVALID_REQUEST)
    rid, code, message = error_of(w.call(tool_call(41, "big", {"size": 10000})))
    assert (rid, code) == (41, jsonrpc.UPSTREAM_FAILED) and "exceeds the 4096-byte limit" in message
    assert text_of(w.call(tool_call(42, "echo", {}))) == "called echo with {}"


def test_invalid_answers_from_the_server(wrapped):
    w = wrapped("--timeout", "1")
    rid, code, message = error_of(w.call(tool_call(1, "garbage", {})))
    assert (rid, code) == (1, jsonrpc.UPSTREAM_FAILED) and "invalid answer" in message
    # An answer for an id nobody asked about is dropped; the call itself then times out.
    assert error_of(w.call(tool_call(2, "wrong_id", {})))[:2] == (2, jsonrpc.UPSTREAM_TIMEOUT)
    # The server was told about its invalid message (before it saw call 2).
    told = [m for m in w.server_saw() if "error" in m]
    assert (told[0]["id"], told[0]["error"]["code"]) == (None, jsonrpc.PARSE_ERROR)
    reasons = [r.reason for r in w.records()]
    assert "the server answered a request the client never made" in reasons


def test_a_hanging_server_times_out(wrapped):
    w = wrapped("--timeout", "1")
    rid, code, message = error_of(w.call(tool_call(1, "hang", {})))
    assert (rid, code) == (1, jsonrpc.UPSTREAM_TIMEOUT) and "within 1 s" in message
    assert w.call(tool_call(2, "echo", {}))["id"] == 2
    cancelled = [m for m in w.server_saw() if m.get("method") == "notifications/cancelled"]
    assert cancelled[0]["params"]["requestId"] == 1
    (rec,) = [r for r in w.records() if r.resource == "hang"]
    assert rec.details["outcome"] == "timeout"


def test_progress_extends_the_deadline(wrapped):
    """A call that runs past the timeout but keeps reporting progress is not
    cut off: the fake server reports every 0.5 s for 3 s, the timeout is 2 s."""
    w = wrapped("--timeout", "2")
    call = tool_call(1, "progress", {"steps": 6})
    call["params"]["_meta"] = {"progressToken": "tok"}
    w.peer.send(call)
    seen = [w.peer.recv() for _ in range(7)]
    assert [m.get("method") for m in seen[:6]] == ["notifications/progress"] * 6
    assert text_of(seen[6]) == "progressed"


def test_the_server_dies(wrapped):
    w = wrapped()
    w.peer.send(tool_call(1, "hang", {}))
    w.peer.send(tool_call(2, "die", {}))
    answers = {m["id"]: m for m in (w.peer.recv(), w.peer.recv())}
    for rid in (1, 2):
        assert answers[rid]["error"]["code"] == jsonrpc.UPSTREAM_FAILED
        assert "exited (status 3) before answering" in answers[rid]["error"]["message"]
    assert w.peer.eof()
    assert w.peer.wait() == 3
    assert {r.resource: r.details["outcome"] for r in w.records()} == {"hang": "server failed",
                                                                       "die": "server failed"}


def test_the_client_goes_away(wrapped):
    w = wrapped()
    w.peer.send(tool_call(1, "hang", {}))
    assert w.call(tool_call(2, "echo", {}))["id"] == 2
    w.peer.close_stdin()                 # the fake server exits when its stdin ends
    assert error_of(w.peer.recv())[:2] == (1, jsonrpc.UPSTREAM_FAILED)
    assert w.peer.wait() == 0
    (rec,) = [r for r in w.records() if r.resource == "hang"]
    assert "before answering" in rec.reason


def test_a_server_that_closes_stdout_is_ended(wrapped):
    w = wrapped()
    rid, code, message = error_of(w.call(tool_call(1, "close_stdout", {})))
    assert (rid, code) == (1, jsonrpc.UPSTREAM_FAILED) and "killed by signal 15" in message
    assert w.peer.wait() == 128 + signal.SIGTERM


def test_a_server_that_ignores_the_end_of_its_input_is_ended(wrapped):
    w = wrapped()
    assert text_of(w.call(tool_call(1, "linger", {}))) == "lingering"
    w.peer.close_stdin()
    assert w.peer.eof()
    assert w.peer.wait() == 128 + signal.SIGTERM


def test_a_server_that_cannot_start(tmp_path):
    policy = write_policy(tmp_path / "policy", POLICY)
    peer = LinePeer(gateway_args(policy, tmp_path / "audit.jsonl", "wrap", "--", "/nonexistent/server"))
    assert peer.eof()
    assert peer.wait() == 127
    assert b"cannot start the MCP server" in peer.proc.stderr.read()


def test_plain_files_as_stdin_and_stdout(tmp_path):
    """A recorded session replayed from a file, answers written to a file."""
    policy = write_policy(tmp_path / "policy", POLICY)
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps(tool_call(1, "delete_file", {})) + "\n" + json.dumps(tool_call(2, "echo", {})) + "\n")
    answers = tmp_path / "out.jsonl"
    with open(requests, "rb") as stdin, open(answers, "wb") as stdout:
        status = subprocess.run(gateway_args(policy, tmp_path / "audit.jsonl", "wrap", "--", sys.executable,
                                             str(FAKE_SERVER), str(tmp_path / "server.log")),
                                stdin=stdin, stdout=stdout, env=ENV, timeout=60).returncode
    assert status == 0
    got = {m["id"]: m for m in map(json.loads, answers.read_text().splitlines())}
    assert got[1]["error"]["code"] == jsonrpc.POLICY_REFUSED and "result" in got[2]


def test_hot_reload_applies_to_the_next_message(wrapped):
    w = wrapped()
    cedar = w.policy / "tools.cedar"
    assert "result" in w.call(tool_call(1, "echo", {}))
    cedar.write_text(POLICY + '@id("echo-off")\nforbid(principal, action, resource == MCP::Tool::"echo");\n')
    assert error_of(w.call(tool_call(2, "echo", {})))[2].endswith("refused by policy echo-off")
    cedar.write_text("permit(principal, action, resource) when { this is not cedar };\n")
    assert error_of(w.call(tool_call(3, "echo", {})))[2].endswith("refused by policy echo-off")
    failed = [r for r in w.records() if r.action == "Internal" and r.decision == "deny"]
    assert len(failed) == 1 and "previous policy stays in force" in failed[0].reason
    cedar.write_text(POLICY)
    assert "result" in w.call(tool_call(4, "echo", {}))


def test_sighup_reloads_even_when_nothing_looks_changed(wrapped):
    w = wrapped()
    assert "result" in w.call(tool_call(1, "echo", {}))       # the wrapper has loaded the policy
    cedar = w.policy / "tools.cedar"
    stat = cedar.stat()
    changed = POLICY.replace('"write_file"', '"echo______"')     # same size
    assert len(changed) == len(POLICY)
    cedar.write_text(changed)
    os.utime(cedar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert error_of(w.call(tool_call(2, "write_file", {})))[1] == jsonrpc.POLICY_REFUSED
    w.peer.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while not any(r.reason == "policy reloaded" for r in w.records()):
        assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
        time.sleep(0.05)
    assert "result" in w.call(tool_call(3, "write_file", {}))


def test_audit_mode_records_but_does_not_refuse(wrapped):
    w = wrapped("--mode", "audit")
    assert text_of(w.call(tool_call(1, "delete_file", {}))) == "called delete_file with {}"
    listed = w.call(request(2, "tools/list"))
    assert [t["name"] for t in listed["result"]["tools"]] == ["echo", "delete_file"]
    rec = next(r for r in w.records() if r.resource == "delete_file")
    assert (rec.decision, rec.mode, rec.policies, rec.details["outcome"]) == ("deny", "audit", ["no-delete"], "result")
    # What enforce mode would refuse as malformed goes through as it came.
    assert "result" in w.call(request(3, "tools/call", {"name": 5}))
    w.peer.send(b'[{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo"}}, 5]')
    assert w.peer.recv() == [{"jsonrpc": "2.0", "id": 4, "result": {"batched": "tools/call"}}]
    assert w.server_saw()[-1] == [{"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "echo"}}, 5]
    # A second request under a pending id is refused in every mode.
    w.peer.send(tool_call(5, "hang", {}))
    assert error_of(w.call(tool_call(5, "echo", {})))[:2] == (None, jsonrpc.INVALID_REQUEST)

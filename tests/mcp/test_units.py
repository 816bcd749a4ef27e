"""The gateway's pure parts: JSON-RPC framing, line and SSE framing, HTTP
chunked bodies, the listing decision."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leash.mcp import jsonrpc, sse
from leash.mcp.decide import decide_call, may_allow
from leash.mcp.httpwire import Framing, HttpError, TooLarge, iter_body, read_body
from leash.mcp.lines import read_lines
from leash.policy.loader import load_policy_dir
from tests.mcp.helpers import POLICY, write_policy

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
ids = st.integers(-2**63, 2**63 - 1) | st.text(max_size=20)


@settings(max_examples=300)
@given(ids, st.dictionaries(st.text(max_size=8).filter(lambda k: k != "id"), json_values, max_size=4),
       st.integers(0, 4), st.integers(0, 200))
def test_salvage_id_finds_the_top_level_id(rid, others, position, cut):
    """Whatever comes before it (nested "id"s included) and however the text
    is cut after it, the request id is recovered from a prefix."""
    members = list(others.items())
    members.insert(min(position, len(members)), ("id", rid))
    text = json.dumps(dict(members)).encode()
    end = text.index(json.dumps(rid).encode(), text.index(b'"id"')) + len(json.dumps(rid).encode()) + 1
    assert jsonrpc.salvage_id(text[:end + cut]) == rid


def test_salvage_id_ignores_nested_ids():
    assert jsonrpc.salvage_id(b'{"params":{"id":1},"x":"\\"id\\": 2"') is None
    assert jsonrpc.salvage_id(b'[{"id":1}]') is None


@given(st.lists(st.sampled_from([b"{}", b'{"a":1}', b"x" * 50, b""]), max_size=6), st.integers(1, 7))
def test_lines_are_split_and_bounded(lines, chunk):
    data = b"".join(line + b"\n" for line in lines)

    async def collect():
        reader = asyncio.StreamReader()
        for i in range(0, len(data), chunk):
            reader.feed_data(data[i:i + chunk])
        reader.feed_eof()
        return [item async for item in read_lines(reader, 10)]

    got = asyncio.run(collect())
    assert got == [(line[:4096], True) if len(line) > 10 else (line, False) for line in lines]


events = st.builds(sse.Event, data=st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b" ")),
                   event=st.sampled_from([None, "message"]), id=st.sampled_from([None, "1", "abc"]))


@given(st.lists(events, max_size=5), st.integers(1, 9), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_sse_parser_is_split_independent(evs, chunk, newline):
    stream = b"".join(sse.encode(e) for e in evs).replace(b"\n", newline)
    parser = sse.Parser(1 << 20)
    got: list[sse.Event] = []
    for i in range(0, len(stream), chunk):
        got += parser.feed(stream[i:i + chunk])
    if newline == b"\r":
        got += parser.feed(b"")
    assert got == evs


def test_sse_oversized_event_is_skipped_whole():
    parser = sse.Parser(100)
    got = parser.feed(b"data: " + b"x" * 300 + b"\ndata: more\n\nid: 2\ndata: ok\n\n")
    assert [(e.oversized, e.data[:5], e.id) for e in got] == [(True, b"xxxxx", None), (False, b"ok", "2")]
    assert parser.feed(b": ping\n\n") == [sse.Event(comment=b" ping")]


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_chunked_bodies():
    async def run():
        body = await read_body(_reader(b"4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nTrailer: x\r\n\r\n"),
                               Framing("chunked"), 100)
        assert body == b"abcdef"
        with pytest.raises(TooLarge):
            await read_body(_reader(b"a\r\n0123456789\r\n0\r\n\r\n"), Framing("chunked"), 5)
        with pytest.raises(HttpError):
            await read_body(_reader(b"zz\r\n"), Framing("chunked"), 100)
        with pytest.raises(HttpError):
            [c async for c in iter_body(_reader(b"abc"), Framing("length", 10))]
    asyncio.run(run())


def test_frames_and_classification():
    frame = jsonrpc.parse(b'[{"jsonrpc":"2.0","method":"n"},{"jsonrpc":"2.0","id":"a","result":{}}]')
    assert frame.batch and [jsonrpc.classify(m) for m in frame.items] == ["notification", "result"]
    for bad in (b'{"jsonrpc":"2.0","id":null,"method":"m"}', b'{"jsonrpc":"2.0","id":1}',
                b'{"jsonrpc":"2.0","id":1,"result":5}', b'{"jsonrpc":"2.0","params":{}}'):
        with pytest.raises(jsonrpc.WireError) as info:
            jsonrpc.parse(bad)
        assert info.value.code == jsonrpc.INVALID_REQUEST
    assert jsonrpc.encode(jsonrpc.error_reply(None, -1, "m")) == b'{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"m"}}'


def test_listing_uses_partial_evaluation(tmp_path):
    policy = load_policy_dir(str(write_policy(tmp_path / "p")))
    shown = {t: may_allow(policy, "claude", "files", t)
             for t in ("echo", "read_file", "add", "delete_file", "write_file")}
    assert shown == {"echo": True, "read_file": True, "add": True, "delete_file": False, "write_file": False}
    assert not may_allow(policy, "intruder", "files", "read_file")       # not in AgentGroup::"coders"
    assert decide_call(policy, "claude", "files", "read_file", {"path": "/workspace/x"}).allow
    assert not decide_call(policy, "claude", "files", "read_file", {"path": "/etc/x"}).allow


def test_listing_hides_a_tool_whose_forbid_cannot_be_evaluated(tmp_path):
    cedar = POLICY + '@id("odd")\nforbid(principal, action, resource == MCP::Tool::"echo") when { context.server like "*" && context.method == "tools/call" && 1 + 9223372036854775807 > 0 };\n'
    policy = load_policy_dir(str(write_policy(tmp_path / "p", cedar)))
    assert not may_allow(policy, "claude", "files", "echo")
    verdict = decide_call(policy, "claude", "files", "echo", {})
    assert not verdict.allow and verdict.policies == ["odd"]

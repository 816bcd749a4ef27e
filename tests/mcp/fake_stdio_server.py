"""A scripted stdio MCP server for the gateway's raw-protocol tests. It
appends every line it receives to the log file named by argv[1] (so tests can
see what reached the server) and misbehaves on request, by tool name."""

import json
import os
import sys
import time

log = open(sys.argv[1], "ab", buffering=0)
out = sys.stdout.buffer
TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("echo", "delete_file", "read_file", "write_file")]


def send(obj):
    out.write(json.dumps(obj).encode() + b"\n")
    out.flush()


def text(rid, s):
    send({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": s}]}})


linger = False               # keep running after stdin ends
waiting_for_roots = None     # id of an "ask" call waiting on the client's roots/list answer
stubborn = {}                # request id -> answered only once cancelled

for line in sys.stdin.buffer:
    log.write(line)
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if isinstance(msg, list):
        send([{"jsonrpc": "2.0", "id": m["id"], "result": {"batched": m["method"]}} for m in msg if isinstance(m, dict) and "id" in m])
        continue
    method, rid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
    if method is None:                           # an answer to one of our requests
        if rid == "s1" and waiting_for_roots is not None:
            text(waiting_for_roots, "roots: " + json.dumps(msg.get("result")))
            waiting_for_roots = None
        continue
    if method == "notifications/cancelled":
        target = params.get("requestId")
        if target in stubborn:
            text(stubborn.pop(target), "answered after all")
        continue
    if rid is None:
        continue
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": rid, "result": {
            "protocolVersion": params.get("protocolVersion", "2025-11-25"),
            "capabilities": {"tools": {}}, "serverInfo": {"name": "fake", "version": "0"}}})
    elif method == "tools/list":
        if params.get("cursor") == "p2":
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS[2:]}})
        else:
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS[:2], "nextCursor": "p2"}})
    elif method == "tools/call":
        name, args = params.get("name"), params.get("arguments")
        if name == "die":
            sys.exit(3)
        elif name == "close_stdout":
            os.close(1)
            time.sleep(3600)
        elif name == "linger":
            linger = True
            text(rid, "lingering")
        elif name == "hang":
            pass
        elif name == "stubborn":
            stubborn[rid] = rid
        elif name == "big":
            text(rid, "x" * args["size"])
        elif name == "wrong_id":
            text("nope", "for nobody")
        elif name == "garbage":
            out.write(b'{"jsonrpc":"2.0","id":' + json.dumps(rid).encode() + b',"result":{oops\n')
            out.flush()
        elif name == "ask":
            send({"jsonrpc": "2.0", "id": "s0", "method": "x/unknown", "params": {}})
            send({"jsonrpc": "2.0", "id": "s1", "method": "roots/list", "params": {}})
            waiting_for_roots = rid
        elif name == "progress":
            token = params["_meta"]["progressToken"]
            for step in range(args["steps"]):
                time.sleep(0.5)
                send({"jsonrpc": "2.0", "method": "notifications/progress",
                      "params": {"progressToken": token, "progress": step + 1}})
            text(rid, "progressed")
        elif name == "whoami":
            with open("/proc/self/cgroup") as f:
                cgroup = f.read().strip()
            text(rid, json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
                                  "cwd": os.getcwd(), "env": dict(os.environ), "cgroup": cgroup}))
        elif name == "notify":
            send({"jsonrpc": "2.0", "method": "notifications/weird", "params": {}})
            send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}})
            text(rid, "notified")
        else:
            text(rid, f"called {name} with {json.dumps(args, sort_keys=True)}")
    else:
        send({"jsonrpc": "2.0", "id": rid, "result": {}})

if linger:
    time.sleep(3600)

"""`leash demo`: a short agent run under the built-in policy, showing what it
may and may not do. The main job of README's first command."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from importlib import resources
from types import SimpleNamespace

WORKSPACE = "/tmp/leash-demo"


def _prepare_workspace() -> None:
    shutil.rmtree(WORKSPACE, ignore_errors=True)
    os.makedirs(os.path.join(WORKSPACE, "secrets"))
    with open(os.path.join(WORKSPACE, "secrets", "token"), "w") as f:
        f.write("demo-secret-token\n")
    tool = os.path.join(WORKSPACE, "downloaded-tool")
    shutil.copy("/bin/true", tool)
    os.chmod(tool, 0o755)


def _serve_loopback() -> int:
    """A local TCP service the agent is allowed to reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def accept():
        while True:
            conn, _ = srv.accept()
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def run_demo(args) -> int:
    from leash.daemon import run
    _prepare_workspace()
    os.environ["LEASH_DEMO_PORT"] = str(_serve_loopback())
    base = resources.files("leash.demo")
    policy_dir = str(base.joinpath("policy"))
    script = base.joinpath("agent.sh").read_text()
    print("leash demo: running an agent under the built-in policy "
          f"({policy_dir}/default.cedar)", flush=True)
    run_args = SimpleNamespace(policy=policy_dir, agent="demo-agent", mode="enforce",
                               backend=args.backend, audit=args.audit,
                               command=["/bin/bash", "-c", script])
    status = run(run_args)
    print(f"leash demo: agent exited with status {status}", flush=True)
    if args.audit:
        print(f"leash demo: every decision is in {args.audit}", flush=True)
    shutil.rmtree(WORKSPACE, ignore_errors=True)
    return 0 if status in (0, 1) else status

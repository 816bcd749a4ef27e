"""Daemon-hosted stdio MCP servers end to end, on this machine's kernel
(compat backend; root; lsm in the VM, see BACKEND): `leash --policy DIR -- python daemon_agent.py` runs
an agent whose official-SDK MCP client reaches the `files` server (an
SDK-built server, tests/mcp/server_app.py) only through the daemon's socket
and published relay. The principal is the agent the kernel put the client
in; the server runs outside the agent's scope, so forbidding the agent its
program does not stop it; a client outside every agent's scope is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from leash.mcp import jsonrpc
from leash.mcp.relay import hello_line
from leash.policy.config import ConfigError, parse_config
from tests.mcp.helpers import CONFIG, ENV, FAKE_SERVER, HERE, POLICY, SERVER_APP, VISIBLE, records

AGENT = HERE / "daemon_agent.py"
# compat on the build machines; the same tests pass under lsm in the VM
# (tools/vm/run -- env LEASH_MCP_TEST_BACKEND=lsm python -m pytest tests/mcp/test_daemon_stdio.py).
BACKEND = os.environ.get("LEASH_MCP_TEST_BACKEND", "compat")

KERNEL_POLICY = """\
@id("agent-files")
permit(principal, action in Action::"FileOpen", resource);

@id("agent-exec")
permit(principal, action == Action::"ProcessExec", resource);

@id("no-server-exec")
forbid(principal, action == Action::"ProcessExec", resource == File::"{program}");

@id("who-tools")
permit(principal, action == Action::"McpCall", resource in MCP::Server::"who");
"""


class Setup:
    """A policy directory declaring two daemon-hosted servers, the socket's
    directory, and the `files` server's program (a script of its own, so a
    policy can forbid it without forbidding python)."""

    def __init__(self, tmp: Path, socket_dir: Path | None = None) -> None:
        self.tmp = tmp
        self.policy = tmp / "policy"
        self.policy.mkdir()
        self.run = socket_dir or tmp / "run"
        self.socket = self.run / "mcp.sock"
        self.relay = self.run / "mcp-relay"
        self.audit = tmp / "audit.jsonl"
        self.program = tmp / "bin" / "mcp-files"
        self.program.parent.mkdir()
        self.program.write_text(f"#!{sys.executable}\nimport runpy\n"
                                f"runpy.run_path({str(SERVER_APP)!r}, run_name='__main__')\n")
        self.program.chmod(0o755)
        (self.policy / "tools.cedar").write_text(POLICY)
        (self.policy / "kernel.cedar").write_text(KERNEL_POLICY.format(program=self.program))
        (self.policy / "leash.toml").write_text(CONFIG + f"""
[mcp]
socket = "{self.socket}"

[mcp.servers.files]
command = ["{self.program}"]

[mcp.servers.broken]
command = ["{tmp}/bin/missing"]

[mcp.servers.who]
command = ["/usr/bin/python3", "{FAKE_SERVER}", "/dev/null"]
user = "nobody"
cwd = "/tmp"
env = {{ FOO = "bar" }}
""")

    def daemon(self, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "leash", "--policy", str(self.policy), "--backend", BACKEND,
                                 "--audit", str(self.audit), *args], env=ENV, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def agent_args(self, **extra: str) -> list[str]:
        setup = {"relay": str(self.relay), "socket": str(self.socket), "server_program": str(self.program),
                 "who": "1", **extra}
        return [sys.executable, str(AGENT), json.dumps(setup)]

    def mcp_records(self):
        return [r for r in records(self.audit) if r.backend == "mcp"]


class Stderr:
    """The daemon's stderr lines, collected by a thread."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, after: int = 0, timeout: float = 300) -> int:
        """Index of the first line from `after` on containing `text`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} on the daemon's stderr; it said: {self.lines[-15:]}")
                self._cond.wait(left)


@pytest.fixture
def root():
    assert os.geteuid() == 0, "daemon-hosted MCP servers are tested under a real daemon, which needs root"


def run_agent(setup: Setup, agent: str, control: Path | None = None) -> tuple[dict, Stderr]:
    extra = {"control": str(control)} if control else {}
    daemon = setup.daemon("--agent", agent, "--", *setup.agent_args(**extra))
    err = Stderr(daemon.stderr)
    if control is not None:
        # The agent has made its first calls and waits; forbid echo, wait
        # until the daemon has the new policy, let the agent go on.
        deadline = time.monotonic() + 600
        while not (control / "phase1").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, err.lines[-15:]
            time.sleep(0.05)
        with open(setup.policy / "tools.cedar", "a") as f:
            f.write('\n@id("echo-off")\nforbid(principal, action, resource == MCP::Tool::"echo");\n')
        err.wait_for("policy reloaded")
        (control / "go").touch()
    out, _ = daemon.communicate(timeout=600)
    assert daemon.returncode == 0, "\n".join(err.lines[-30:])
    return json.loads(out.strip().splitlines()[-1]), err


def test_governed_agent_reaches_the_server_only_as_itself(root, tmp_path):
    setup = Setup(tmp_path)
    control = tmp_path / "control"
    control.mkdir()
    seen, err = run_agent(setup, "claude", control)

    # The agent's policy forbids it the server's program...
    assert seen["direct_exec"].startswith("refused")
    # ...and the daemon-hosted server works all the same, decided by Cedar.
    assert seen["listed"] == VISIBLE
    assert seen["echo"] == "hi"
    assert seen["read_workspace"] == "contents of /workspace/notes.txt"
    assert seen["delete"]["code"] == jsonrpc.POLICY_REFUSED
    assert "refused by policy no-delete" in seen["delete"]["message"]
    assert "default deny" in seen["read_etc"]["message"]
    # The daemon's live policy decides the session's next message.
    assert seen["echo_after_reload"]["code"] == jsonrpc.POLICY_REFUSED
    assert "refused by policy echo-off" in seen["echo_after_reload"]["message"]
    # A hello cannot name an agent.
    assert seen["claim"]["error"]["code"] == jsonrpc.INVALID_REQUEST
    # The relay's errors are one line each, and it exits 1.
    assert seen["unknown_server"] == {"status": 1, "stdout": "", "stderr": (
        "leash: no MCP server 'nope' in the daemon's leash.toml ([mcp.servers.nope])\n")}
    assert seen["broken_server"] == {"status": 1, "stdout": "", "stderr": (
        f"leash: cannot start the MCP server '{tmp_path}/bin/missing': No such file or directory\n")}

    # The second server runs as configured, and in no agent's scope.
    who = seen["whoami"]
    assert (who["uid"], who["cwd"], who["env"]["FOO"], who["env"]["HOME"]) == (65534, "/tmp", "bar", "/nonexistent")
    assert who["gid"] == 65534 and 0 not in who["groups"]
    assert "leash" not in who["cgroup"]
    assert "PYTHONPATH" not in who["env"], "the daemon's environment is not passed on"

    recs = setup.mcp_records()
    assert {r.agent for r in recs} == {"claude"}, "every record names the agent the kernel assigned"
    calls = [(r.resource, r.decision, r.details["outcome"]) for r in recs
             if r.details.get("method") == "tools/call" and r.details["server"] == "files"]
    assert calls == [("echo", "allow", "result"), ("read_file", "allow", "result"),
                     ("delete_file", "deny", "refused"), ("read_file", "deny", "refused"),
                     ("echo", "deny", "refused")]
    assert all(r.details["transport"] == "daemon" for r in recs)
    listing = [r for r in recs if r.resource == "tools/list"]
    assert [sorted(r.details["hidden"]) for r in listing] == [["delete_file", "write_file"]]
    connected = [r for r in recs if r.details["outcome"] == "connected"]
    assert sorted(r.details["server"] for r in connected) == ["files", "who"]
    refused = {r.details["server"]: r for r in recs if r.details["outcome"] == "refused connection"}
    assert sorted(refused) == ["-", "broken", "nope"]
    assert all(r.agent == "claude" and r.decision == "deny" for r in refused.values())
    claim = [refused["-"]]
    assert "hello" in claim[0].reason
    # Records carry the connecting process: the claim came from the agent
    # itself, every session from a relay the SDK client started.
    assert claim[0].pid == seen["agent_pid"]
    assert seen["agent_pid"] not in {r.pid for r in recs if r is not claim[0]}
    # The session and its server ended with the agent; the daemon removed what it made.
    assert not setup.socket.exists() and not setup.relay.exists()


def test_another_agent_gets_its_own_policy(root, tmp_path):
    """The same client and relay in another agent's scope: `intruder` is not
    in AgentGroup coders, so read_file is hidden and refused."""
    setup = Setup(tmp_path)
    seen, _ = run_agent(setup, "intruder")
    assert seen["listed"] == ["add", "count", "echo"]
    assert seen["read_workspace"]["code"] == jsonrpc.POLICY_REFUSED
    assert seen["echo"] == "hi"
    assert {r.agent for r in setup.mcp_records()} == {"intruder"}


def test_ungoverned_client_is_refused(root, tmp_path):
    """The daemon without `-- CMD`: this test process is in no agent's scope."""
    setup = Setup(tmp_path)
    daemon = setup.daemon()
    err = Stderr(daemon.stderr)
    try:
        err.wait_for("serving MCP servers broken, files, who")
        assert stat.S_IMODE(setup.socket.stat().st_mode) == 0o666
        assert stat.S_IMODE(setup.run.stat().st_mode) == 0o755
        assert stat.S_IMODE(setup.relay.stat().st_mode) == 0o755

        relay = subprocess.run([sys.executable, str(setup.relay), "files"], input=b"", capture_output=True,
                               timeout=60)
        assert relay.returncode == 1 and relay.stdout == b""
        assert relay.stderr.decode().startswith(f"leash: refused: pid {relay_pid(setup)} is not a governed agent")

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(setup.socket))
            s.sendall(hello_line("files"))
            answer = json.loads(s.makefile("rb").readline())
        assert answer["id"] is None and answer["error"]["code"] == jsonrpc.CONNECTION_REFUSED
        assert f"pid {os.getpid()} is not a governed agent" in answer["error"]["message"]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    assert daemon.returncode == 0
    gone = subprocess.run([sys.executable, str(HERE.parent.parent / "leash" / "mcp" / "relay.py"), "files",
                           "--socket", str(setup.socket)], input=b"", capture_output=True, timeout=60)
    assert gone.returncode == 1
    assert gone.stderr.decode() == (f"leash: no leash daemon serves MCP at {setup.socket} (it is not running, "
                                    "or its leash.toml has no [mcp.servers])\n")
    refusals = [r for r in setup.mcp_records() if r.details["outcome"] == "refused connection"]
    assert [(r.agent, r.decision, r.details["server"]) for r in refusals] == [("", "deny", "files")] * 2
    assert refusals[1].pid == os.getpid()
    assert not setup.socket.exists()


def relay_pid(setup: Setup) -> int:
    """The relay's pid, from its refusal record (it has exited by now)."""
    (rec,) = [r for r in setup.mcp_records() if r.details["outcome"] == "refused connection"]
    return rec.pid


def test_a_socket_another_process_serves_is_left_alone(root, tmp_path):
    setup = Setup(tmp_path)
    setup.run.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(setup.socket))
        other.listen(1)
        daemon = setup.daemon("--", "/bin/true")
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1
    assert f"cannot serve MCP on {setup.socket}: another process is serving it" in err
    assert setup.socket.exists()


def test_socket_in_a_directory_others_may_write_is_refused(root, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    setup = Setup(tmp_path, socket_dir=shared)
    daemon = setup.daemon("--", "/bin/true")
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1
    assert f"the MCP socket directory {shared} must be owned by uid 0 and writable by no one else" in err
    assert not setup.socket.exists()


@pytest.mark.parametrize("table, error", [
    ('command = ["mcp-files"]', "mcp.servers.files.command: the program must be an absolute path, got 'mcp-files'"),
    ("command = []", "mcp.servers.files.command is empty"),
    ('command = ["/bin/x"]\nport = 3', "Object contains unknown field `port` - at `$.mcp.servers.files`"),
    ("env = {}", "Object missing required field `command` - at `$.mcp.servers.files`"),
    ('command = ["/bin/x"]\ncwd = "srv"', "mcp.servers.files.cwd must be an absolute path"),
    ('command = ["/bin/x"]\nuser = true', "at `$.mcp.servers.files.user`"),
    ('command = ["/bin/x"]\nenv = { "A=B" = "1" }', "mcp.servers.files.env: 'A=B' is not a valid"),
])
def test_server_config_errors_name_the_key(table, error):
    with pytest.raises(ConfigError) as info:
        parse_config(f"[mcp.servers.files]\n{table}\n")
    assert error in str(info.value)

"""The main job end to end on this machine's kernel (compat backend; root):
live policy reload on file change and on SIGHUP, refusal of a bad change with
the old policy kept in force, exit statuses, signals, and nothing the agent
started outliving the run."""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_DIR = "/tmp/leash-daemon-test"
TARGET = f"{TARGET_DIR}/f"

SYSTEM = '''\
@id("system")
permit (principal, action == Action::"FileOpenReadOnly", resource)
when { resource in [Dir::"/usr/", Dir::"/lib/", Dir::"/lib64/", Dir::"/bin/", Dir::"/etc/", Dir::"/proc/", Dir::"/dev/"] };
@id("tools")
permit (principal, action == Action::"ProcessExec", resource)
when { resource in [Dir::"/usr/", Dir::"/bin/", Dir::"/lib/", Dir::"/lib64/"] };
@id("null")
permit (principal, action == Action::"FileOpenReadWrite", resource == File::"/dev/null");
'''
TARGET_PERMIT = f'@id("target")\npermit (principal, action == Action::"FileOpenReadOnly", resource in Dir::"{TARGET_DIR}/");\n'
TARGET_FORBID = TARGET_PERMIT.replace("permit", "forbid")
LOOP = f"while :; do if cat {TARGET} >/dev/null 2>&1; then echo allowed; else echo denied; fi; sleep 0.05; done"



@pytest.fixture(autouse=True)
def needs_root():
    assert os.geteuid() == 0, "tests/test_daemon.py runs leash for real and needs root"


def leash_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "leash", *args]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")


class Lines:
    """A stream's lines, collected by a thread."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.q.put(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no matching line within {timeout}s; last lines: {self.seen[-10:]}")


@pytest.fixture
def target():
    os.makedirs(TARGET_DIR, exist_ok=True)
    with open(TARGET, "w") as f:
        f.write("data\n")
    yield TARGET
    subprocess.run(["rm", "-rf", TARGET_DIR])


def test_policy_reloads_live_refuses_bad_changes_and_honours_sighup(tmp_path, target):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "system.cedar").write_text(SYSTEM)
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(leash_cmd("--policy", str(policy), "--agent", "looper", "--audit", str(audit),
                                      "--", "/bin/bash", "-c", LOOP),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        out.wait_for(lambda x: x == "denied")

        # A valid change goes live on its own.
        (policy / "target.cedar").write_text(TARGET_PERMIT)
        err.wait_for(lambda x: "policy reloaded" in x)
        out.wait_for(lambda x: x == "allowed")

        # A broken change is refused with file:line, and the old policy stays.
        (policy / "broken.cedar").write_text("permit (principal, action, resource) when { 1 + };\n")
        err.wait_for(lambda x: x.startswith("broken.cedar:1:"))
        err.wait_for(lambda x: "policy change refused" in x)
        for _ in range(5):
            assert out.wait_for(lambda x: True) == "allowed"
        (policy / "broken.cedar").unlink()        # back to the policy in force: nothing to reload

        # A change the watcher cannot see (same size, old mtime) waits for SIGHUP.
        st = os.stat(policy / "target.cedar")
        (policy / "target.cedar").write_text(TARGET_FORBID)
        os.utime(policy / "target.cedar", ns=(st.st_atime_ns, st.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        err.wait_for(lambda x: "policy reloaded" in x)
        out.wait_for(lambda x: x == "denied")
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    assert status == 128 + signal.SIGTERM            # the agent's status: killed by the forwarded SIGTERM
    records = [json.loads(x) for x in audit.read_text().splitlines()]
    refused = [r for r in records if r["action"] == "PolicyReload"]
    assert refused and refused[0]["decision"] == "deny" and "broken.cedar:1:" in refused[0]["reason"]
    assert any(r["action"] == "FileOpenReadOnly" and r["resource"] == TARGET and r["decision"] == "deny"
               and r.get("policies") == ["target"] for r in records)


def test_exit_status_and_nothing_outlives_the_agent(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "system.cedar").write_text(SYSTEM)
    marker = f"leash-orphan-{os.getpid()}"
    script = (f"exec -a {marker} sleep 300 & disown; "
              f"setsid bash -c 'exec -a {marker} sleep 301' & "
              "sleep 0.5; exit 7")
    r = subprocess.run(leash_cmd("--policy", str(policy), "--agent", "quitter", "--", "/bin/bash", "-c", script),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 7, r.stderr
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes outlived the agent: {left.stdout}"


def test_missing_command_and_bad_policy_are_clear(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "system.cedar").write_text(SYSTEM)
    r = subprocess.run(leash_cmd("--policy", str(policy), "--", "/no/such/program"),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 127 and "cannot run /no/such/program" in r.stderr
    (policy / "bad.cedar").write_text('permit (principal, action, resource in Dir::"relative/");\n')
    r = subprocess.run(leash_cmd("--policy", str(policy), "--", "/bin/true"),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2
    assert "bad.cedar:1:" in r.stderr and "not an absolute path" in r.stderr
    assert "Traceback" not in r.stderr


def test_user_drops_privileges_before_the_agent_starts(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "system.cedar").write_text(SYSTEM)
    r = subprocess.run(leash_cmd("--policy", str(policy), "--user", "nobody", "--",
                                 "/bin/sh", "-c", 'echo "$(id -u) $(id -g) $USER"'),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0, r.stderr
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert r.stdout.split() == [str(nobody.pw_uid), str(nobody.pw_gid), "nobody"]
    r = subprocess.run(leash_cmd("--policy", str(policy), "--user", "no-such-user-x", "--", "/bin/true"),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and "no such user: no-such-user-x" in r.stderr


ESCAPES = r'''
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def err(rc):
    return 0 if rc >= 0 else ctypes.get_errno()

def ptrace(pid):
    rc = libc.ptrace(16, pid, None, None)           # PTRACE_ATTACH
    if rc == 0:
        libc.ptrace(17, pid, None, None)            # PTRACE_DETACH
    return err(rc)

def opened(path):
    try:
        os.close(os.open(path, os.O_RDONLY))
        return 0
    except OSError as e:
        return e.errno

def opened_w(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
        return 0
    except OSError as e:
        return e.errno

daemon = os.getppid()
responders = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"compat_responder" in f.read():
                responders.append(int(pid))
    except OSError:
        pass
try:
    os.mknod("DIR/sda", 0o600 | 0o060000, os.makedev(8, 0))          # S_IFBLK
    mknod = 0
except OSError as e:
    mknod = e.errno
attr = ctypes.create_string_buffer(16)
print(json.dumps({
    "bounding": next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapBnd")),
    "ptrace_daemon": ptrace(daemon), "ptrace_responders": [ptrace(p) for p in responders],
    "daemon_mem": opened(f"/proc/{daemon}/mem"), "mknod": mknod,
    "bpf": err(libc.syscall(321, 11, attr, 16)),     # BPF_PROG_GET_NEXT_ID
    "oom": [open(f"/proc/{p}/oom_score_adj").read().strip() for p in ("self", daemon)],
    "spare_self": opened_w("/proc/self/oom_score_adj", "-1000"),
}))
'''


def test_a_root_agent_cannot_reach_into_leash_nor_below_the_policy(tmp_path):
    # compat has no hook for ptrace, bpf() or mknod: the command runs without
    # the capabilities for them (leash/capabilities.py), and the kernel lets
    # no process trace one holding capabilities it lacks (leash's, the
    # host's root services), so root alone is not enough
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "system.cedar").write_text(SYSTEM)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    script = ESCAPES.replace("DIR", str(scratch))
    r = subprocess.run(leash_cmd("--policy", str(policy), "--", "/usr/bin/python3", "-c", script),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["bounding"] == "00000000a00005fb"       # CHOWN .. SETPCAP, NET_BIND_SERVICE, AUDIT_WRITE, SETFCAP
    assert got["ptrace_daemon"] == errno.EPERM
    assert got["ptrace_responders"] and set(got["ptrace_responders"]) == {errno.EPERM}
    assert got["daemon_mem"] in (errno.EACCES, errno.EPERM)
    assert got["mknod"] == errno.EPERM and not (scratch / "sda").exists()
    assert got["bpf"] == errno.EPERM
    # the agent cannot spare itself from the OOM killer (leash's own -1000 is
    # checked in the VM: this machine's root lacks CAP_SYS_RESOURCE)
    assert got["oom"][0] == "0" and got["spare_self"] == errno.EACCES
    r = subprocess.run(leash_cmd("--policy", str(policy), "--cap-add", "net_admin", "--", "/bin/sh", "-c",
                                 "grep CapBnd /proc/self/status"),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.stdout.split() == ["CapBnd:", "00000000a00015fb"], r.stderr
    r = subprocess.run(leash_cmd("--policy", str(policy), "--cap-add", "warp_drive", "--", "/bin/true"),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and "unknown capability: warp_drive" in r.stderr

"""Helpers of the in-VM kernel suite: the policy, the file tree, agents, records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


from leash.audit import AuditRecord
from leash.kernel import cgroup
from leash.kernel.lsm import LsmBackend
from leash.policy.compiler import compile_tables
from leash.policy.loader import load_policy_dir

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
PYTHON = "/usr/bin/python3"          # the agent's interpreter: stdlib only
LT = "/tmp/lt"                       # the files the policies speak about
AGENTS = {"bot": 1}

# The policy every test module starts from. Read anything, write only under
# w/ (never w/secrets/ nor w/key.txt), run /usr and bin/ (never bin/forbidden),
# reach 127.0.0.1 and ::1 on 8080 (TCP or UDP) and UDP 5353.
POLICY = f"""
@id("read-anything")
permit (principal == Agent::"bot", action == Action::"FileOpenReadOnly", resource in Dir::"/");
@id("work")
permit (principal == Agent::"bot", action in Action::"FileOpen", resource in Dir::"{LT}/w/");
@id("etc-hostname")
permit (principal == Agent::"bot", action in Action::"FileOpen", resource == File::"/etc/hostname");
@id("devnull")
permit (principal, action in Action::"FileOpen", resource == File::"/dev/null");
@id("no-secrets")
forbid (principal, action in Action::"FileOpen", resource in Dir::"{LT}/w/secrets/");
@id("no-key")
forbid (principal, action in Action::"FileOpen", resource == File::"{LT}/w/key.txt");
@id("exec-usr")
permit (principal, action == Action::"ProcessExec", resource in Dir::"/usr/");
@id("exec-bin")
permit (principal, action == Action::"ProcessExec", resource in Dir::"{LT}/bin/");
@id("no-forbidden")
forbid (principal, action == Action::"ProcessExec", resource == File::"{LT}/bin/forbidden");
@id("local-8080")
permit (principal, action == Action::"NetworkConnect", resource in Host::"127.0.0.1")
  when {{ context.port == 8080 }};
@id("local6-8080")
permit (principal, action == Action::"NetworkConnect", resource in Host::"::1")
  when {{ context.port == 8080 }};
@id("mdns-udp")
permit (principal, action == Action::"NetworkConnect", resource in Host::"127.0.0.1")
  when {{ context.port == 5353 && context.protocol == "udp" }};
"""


def make_world() -> None:
    """A fresh file tree under LT, made by the (ungoverned) test process."""
    shutil.rmtree(LT, ignore_errors=True)
    for d in ("w/secrets", "bin", "ro"):
        os.makedirs(f"{LT}/{d}")
    for path, text in (("w/ok.txt", "ok"), ("w/secrets/s.txt", "secret"), ("w/key.txt", "key"),
                       ("ro/r.txt", "read only")):
        with open(f"{LT}/{path}", "w") as f:
            f.write(text)
    shutil.copy("/usr/bin/true", f"{LT}/bin/allowed")
    shutil.copy("/usr/bin/true", f"{LT}/bin/forbidden")


def write_policy(directory: str, text: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "policy.cedar"), "w") as f:
        f.write(text)
    with open(os.path.join(directory, "leash.toml"), "w") as f:
        f.write('[agents.bot]\n')


def compile_dir(directory: str):
    return compile_tables(load_policy_dir(directory), AGENTS)


class Records:
    """The audit sink: every AuditRecord the backend hands over."""

    def __init__(self) -> None:
        self.items: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()

    def __call__(self, rec: AuditRecord) -> None:
        self._open.wait()
        with self._lock:
            self.items.append(rec)

    @contextmanager
    def held(self) -> Iterator[None]:
        """A stuck audit sink: every delivery waits until the block ends."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def find(self, pred: Callable[[AuditRecord], bool], timeout: float = 10.0) -> AuditRecord:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for rec in self.items:
                    if pred(rec):
                        return rec
            if time.monotonic() > deadline:
                raise AssertionError("no matching audit record among:\n" +
                                     "\n".join(str(r) for r in self.items[-40:]))
            time.sleep(0.05)

    def matching(self, pred: Callable[[AuditRecord], bool]) -> list[AuditRecord]:
        with self._lock:
            return [r for r in self.items if pred(r)]

    def at_least(self, n: int, pred: Callable[[AuditRecord], bool], timeout: float = 10.0) -> list[AuditRecord]:
        """Every matching record, once there are n (records arrive asynchronously)."""
        deadline = time.monotonic() + timeout
        while len(found := self.matching(pred)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} matching audit records, not {n}:\n" +
                                     "\n".join(str(r) for r in self.items[-40:]))
            time.sleep(0.05)
        return found


class Agent:
    """A worker process; governed when started inside an agent cgroup."""

    def __init__(self, cgroup_path: str | None) -> None:
        enter = f'echo $$ > {cgroup_path}/cgroup.procs && ' if cgroup_path else ""
        self.proc = subprocess.Popen(["/bin/sh", "-c", f"{enter}exec {PYTHON} {WORKER}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
        self.pid = self.proc.pid

    def send(self, code: str) -> None:
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker {self.pid} died (status {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"worker raised {reply['error']}")
        return reply["result"]

    def run(self, code: str):
        self.send(code)
        return self.receive()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


class Leash:
    """A started backend with one governed agent cgroup."""

    def __init__(self, backend, records: Records, cgroup_path: str, policy_dir: str) -> None:
        self.backend = backend
        self.records = records
        self.cgroup = cgroup_path
        self.policy_dir = policy_dir

    def agent(self) -> Agent:
        return Agent(self.cgroup)


@contextmanager
def running(tmp_dir: str, mode: str = "enforce", policy: str = POLICY, backend_class=LsmBackend,
            **options) -> Iterator[Leash]:
    """A fresh file tree, `policy` compiled and enforced by a started backend
    (the compat suite passes its own class and options), and the agent's cgroup."""
    make_world()
    policy_dir = os.path.join(tmp_dir, "policy")
    write_policy(policy_dir, policy)
    records = Records()
    backend = backend_class(protected_paths=[policy_dir], **options)
    backend.start(compile_dir(policy_dir), mode, records)
    cg = cgroup.create_agent_cgroup("bot", f"{os.getpid()}-{time.monotonic_ns()}")
    try:
        backend.govern(AGENTS["bot"], cg)
        yield Leash(backend, records, cg, policy_dir)
    finally:
        cgroup.kill_all(cg)
        backend.stop()
        cgroup.remove_cgroup(cg)


def other_agent() -> Agent:
    return Agent(None)


def cgroup_of(pid: int) -> str:
    """The cgroup v2 directory process `pid` is in now."""
    with open(f"/proc/{pid}/cgroup") as f:
        rel = next(line[3:].strip() for line in f if line.startswith("0::"))
    return os.path.join(cgroup.cgroup2_mount(), rel.lstrip("/"))


# What a non-leader thread execs (start_thread_exec): whether the new image
# may open the secret (its errno), its pid, then it waits for stdin to close.
PROBE = (f"import os, sys\ntry:\n    os.close(os.open('{LT}/w/secrets/s.txt', os.O_RDONLY)); e = 0\n"
         f"except OSError as x:\n    e = x.errno\nprint(e, os.getpid(), flush=True)\nsys.stdin.readline()")


def start_thread_exec(agent: Agent) -> None:
    """A second thread in the worker opens a file (so it has asked the
    kernel about its scope), then waits for finish_thread_exec to exec PROBE."""
    agent.run("import threading\nready, go = threading.Event(), threading.Event()\n"
              "def _later():\n"
              f"    try_open('{LT}/w/ok.txt')\n"
              "    ready.set()\n"
              "    go.wait()\n"
              f"    os.execv('{PYTHON}', ['python3', '-c', {PROBE!r}])\n"
              "threading.Thread(target=_later).start()\nready.wait()\nresult = 0")


def finish_thread_exec(agent: Agent) -> tuple[int, int]:
    """The waiting thread execs PROBE (the kernel ends every other thread):
    the new image's errno opening the secret, and its pid."""
    agent.send("go.set()\nimport time\ntime.sleep(60)")
    line = agent.proc.stdout.readline().split()
    assert len(line) == 2, f"the exec'd probe said {line!r}"
    return int(line[0]), int(line[1])


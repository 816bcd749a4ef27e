"""`leash --policy DIR -- CMD ARGS`: run CMD as a governed agent.

The child is forked before leash starts any thread and waits on a pipe; leash
moves it into a fresh cgroup under its own root, tells the backend that cgroup
is the agent, and only then lets it exec CMD. So CMD's very first instruction
already runs governed. When CMD exits, whatever it left running in its scope
is killed: nothing the agent started outlives its governance. CMD keeps only
the capabilities capabilities.py names (plus --cap-add), whatever user it
runs as.
"""

from __future__ import annotations

import os
import pwd
import sys

import msgspec

from leash import capabilities, oom
from leash.kernel import cgroup


class RunAs(msgspec.Struct, frozen=True):
    """The account CMD runs as, resolved before anything is governed (name
    lookups read /etc/passwd, /etc/group and NSS modules)."""
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str


def resolve_user(spec: str) -> RunAs:
    """A user name or uid; raises ValueError with a one-line reason."""
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, OverflowError):
        raise ValueError(f"no such user: {spec}") from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return RunAs(entry.pw_uid, entry.pw_gid, groups, entry.pw_name, entry.pw_dir)


class AgentRun:
    def __init__(self, agent: str, command: list[str], run_as: RunAs | None = None,
                 keep_caps: frozenset[str] = capabilities.AGENT_KEEPS) -> None:
        self.agent = agent
        self.command = command
        self.run_as = run_as
        self.keep_caps = keep_caps
        self.pid = 0
        self.cgroup_path: str | None = None
        self._go: int | None = None

    def fork(self) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                   # child: wait for the go byte, then exec
            os.close(w)
            oom.restore_default()      # now: once governed, /proc/self is the policy's to judge
            go = os.read(r, 1)
            os.close(r)
            if go != b"x":
                os._exit(125)
            try:
                capabilities.drop_bounding(self.keep_caps)
                if self.run_as is not None:
                    u = self.run_as
                    os.setgroups(list(u.groups))
                    os.setgid(u.gid)
                    os.setuid(u.uid)
                    os.environ.update(HOME=u.home, USER=u.name, LOGNAME=u.name)
                os.execvp(self.command[0], self.command)
            except OSError as e:
                print(f"leash: cannot run {self.command[0]}: {e.strerror or e}", file=sys.stderr, flush=True)
                os._exit(127)
        os.close(r)
        self.pid, self._go = pid, w

    def place(self, agent_id: int, backend) -> None:
        """Fresh cgroup, governed as agent_id, child inside it."""
        self.cgroup_path = cgroup.create_agent_cgroup(self.agent, self.pid)
        backend.govern(agent_id, self.cgroup_path)
        cgroup.move_pid(self.cgroup_path, self.pid)

    def release(self) -> None:
        os.write(self._go, b"x")
        os.close(self._go)
        self._go = None

    def forward(self, signum: int) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        """CMD's exit status (128+N when killed by signal N)."""
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def cleanup(self) -> None:
        if self._go is not None:       # never released: let the child exit unexec'd
            os.close(self._go)
            self._go = None
            if self.pid:
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
        if self.cgroup_path is not None:
            cgroup.remove_cgroup(self.cgroup_path)
            self.cgroup_path = None

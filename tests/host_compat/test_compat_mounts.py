"""Mounts: an agent that can mount (root, or anyone inside a user namespace
of its own) could bind-mount a forbidden directory under an allowed path or
read it through an overlay. compat cannot refuse the mount: the mounter is
killed before it returns, its mount namespace is poisoned (any governed
process opening files there later is killed too), and files reached through
mounts outside leash's namespace are judged by their real path."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from compat_harness import LT, running

EPERM = errno.EPERM
NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"


@pytest.fixture(scope="module")
def lz(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("mounts"))) as lz:
        yield lz


@pytest.fixture(autouse=True)
def dirs(lz):
    for d in ("pub", "up", "wk", "ov"):
        os.makedirs(f"{LT}/w/{d}", exist_ok=True)
    subprocess.run(["chmod", "-R", "a+rwX", LT], check=True)


def as_agent(lz, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", f'echo $$ > {lz.cgroup}/cgroup.procs && exec /bin/sh -c "$0"', script],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("who, script", [
    ("root", f"unshare -m sh -c 'mount --bind {LT}/w/secrets {LT}/w/pub && cat {LT}/w/pub/s.txt'"),
    ("unprivileged", f"{NOBODY} unshare -Urm sh -c 'mount --bind {LT}/w/secrets {LT}/w/pub && cat {LT}/w/pub/s.txt'"),
    ("overlay", f"{NOBODY} unshare -Urm sh -c 'mount -t overlay o -o lowerdir={LT}/w/secrets,"
                f"upperdir={LT}/w/up,workdir={LT}/w/wk {LT}/w/ov && cat {LT}/w/ov/s.txt'"),
])
def test_mounting_agent_is_killed(lz, who, script):
    r = as_agent(lz, script)
    assert "secret" not in r.stdout
    assert r.returncode == 128 + 9 or "Killed" in r.stderr, (r.returncode, r.stderr)
    rec = lz.records.find(lambda x: x.action == "SelfProtect" and x.reason.startswith("mount by a governed"))
    assert rec.decision == "deny" and rec.backend == "compat"


def test_namespace_mates_are_killed_at_their_next_open(lz):
    # a sibling waits inside the new namespace until the other one has mounted
    # (--propagation unchanged: unshare(1) would otherwise mount itself)
    script = (f"{NOBODY} unshare -Urm --propagation unchanged sh -c '(for i in $(seq 100); do [ -e {LT}/w/pub/s.txt ] && break;"
              f" sleep 0.1; done; cat {LT}/w/pub/s.txt) & mount --bind {LT}/w/secrets {LT}/w/pub; wait'")
    r = as_agent(lz, script)
    assert "secret" not in r.stdout
    lz.records.find(lambda x: x.action == "SelfProtect" and x.reason.startswith("open in a mount namespace"))


def test_ungoverned_mounts_are_untouched(lz):
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"mount --bind {LT}/w/secrets {LT}/w/pub && cat {LT}/w/pub/s.txt"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "secret"


def test_files_through_a_foreign_mount_are_judged_by_their_real_path(lz):
    # An ungoverned process keeps a private namespace where the secrets are
    # bind-mounted under w/pub; the agent reaches in through /proc/PID/root.
    holder = subprocess.Popen(["unshare", "-m", "sh", "-c",
                               f"mount --bind {LT}/w/secrets {LT}/w/pub && echo up && sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        sleeper = int(subprocess.check_output(["pgrep", "-P", str(holder.pid)]).split()[0])
        via = f"/proc/{sleeper}/root{LT}/w/pub/s.txt"
        assert open(via).read() == "secret"                      # outsiders: untouched
        bot = lz.agent()
        try:
            assert bot.run(f"result = try_open('{via}')") == EPERM
            assert bot.run(f"result = try_open('/proc/{sleeper}/root{LT}/w/ok.txt')") == 0
        finally:
            bot.close()
        rec = lz.records.find(lambda x: x.resource == f"{LT}/w/secrets/s.txt" and x.decision == "deny"
                              and x.pid == bot.pid)
        assert rec.policies == ["no-secrets"]
    finally:
        holder.kill()
        holder.wait()

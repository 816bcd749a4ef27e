"""`sudo leash --policy DIR -- CMD` on this machine, as an operator runs it:
the compat backend is chosen on its own, enforces, and reports; the same on
a pure cgroup-v2 layout; and a host without what compat needs gets a
one-line reason and a non-zero exit, never a half-enforced start."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from compat_harness import LT, POLICY, REPO, leash_cli, make_world, other_agent, write_policy
from leash.kernel.backend import probe_lsm
from leash.kernel.session import PIN_ROOT

SCRIPT = (f"cat {LT}/w/ok.txt; echo; cat {LT}/w/secrets/s.txt; echo rc=$?; "
          f"{shlex.quote('/usr/bin/python3')} -c 'import socket; s = socket.socket();"
          f" print(s.connect_ex((\"127.0.0.1\", 8081)))'")


@pytest.fixture
def policy_dir(tmp_path):
    make_world()
    d = str(tmp_path / "policy")
    write_policy(d, POLICY)
    return d


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_run_picks_a_backend_by_itself(policy_dir):
    # compat exactly where BPF LSM programs do not load (the build machines)
    expected = "lsm" if probe_lsm().ok else "compat"
    r = leash_cli("--policy", policy_dir, "--agent", "bot", "--", "/bin/true")
    assert r.returncode == 0, r.stderr
    assert f"with the {expected} backend" in r.stderr


def test_run_with_compat_enforces(policy_dir, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    r = leash_cli("--policy", policy_dir, "--backend", "compat", "--agent", "bot", "--audit", audit,
                  "--", "/bin/sh", "-c", SCRIPT + "; echo leash=$PPID >&2; exit 7")
    assert r.returncode == 7, r.stderr                       # the command's own status
    assert r.stdout.split("\n")[:3] == ["ok", "rc=1", "1"]   # read ok; secret EPERM; connect EPERM
    assert "with the compat backend" in r.stderr
    assert f"denied bot[" in r.stderr and f"{LT}/w/secrets/s.txt (no-secrets)" in r.stderr
    recs = _records(audit)
    assert {x["backend"] for x in recs} == {"compat"}
    assert any(x["resource"] == f"{LT}/w/secrets/s.txt" and x["decision"] == "deny" for x in recs)
    assert any(x["resource"] == "127.0.0.1:8081" and x["decision"] == "deny" for x in recs)
    leash_pid = r.stderr.split("leash=")[1].split()[0]
    assert not os.path.exists(os.path.join(PIN_ROOT, leash_pid))    # a clean stop unpins


def test_forcing_lsm_works_only_where_it_loads(policy_dir):
    r = leash_cli("--policy", policy_dir, "--backend", "lsm", "--", "/bin/true")
    if probe_lsm().ok:
        assert r.returncode == 0 and "with the lsm backend" in r.stderr, r.stderr
        return
    assert r.returncode != 0                # an error, never a silent fallback to compat
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "compat" in lines[0]


def test_doctor_lists_each_compat_mechanism():
    r = leash_cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    names = {p["name"]: p["ok"] for p in report["probes"]}
    for mechanism in ("BTF", "cgroup v2", "tp_btf programs", "ring buffer", "cgroup sock_addr attach",
                      "syscall tracepoints", "fanotify permission events"):
        assert names[f"compat: {mechanism}"] is True
    assert report["usable_backend"] == ("lsm" if probe_lsm().ok else "compat")


def _in_namespace(setup: str, policy_dir: str, audit: str) -> tuple[int, str, str]:
    """Run leash in a private mount namespace prepared by `setup` (sh)."""
    cmd = (f"mount --make-rprivate / && {setup} && "
           f"cd / && PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1 exec {shlex.quote(os.sys.executable)} -m leash "
           f"--policy {policy_dir} --backend compat --agent bot --audit {audit} "
           f"-- /bin/sh -c {shlex.quote(SCRIPT + '; exit 7')}")
    import subprocess
    r = subprocess.run(["unshare", "-m", "/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_pure_cgroup_v2_layout(policy_dir, tmp_path):
    # cgroup2 alone at /sys/fs/cgroup, as on a current systemd distribution
    audit = str(tmp_path / "audit.jsonl")
    code, out, err = _in_namespace("umount -R /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup",
                                   policy_dir, audit)
    assert code == 7, err
    assert out.split("\n")[:3] == ["ok", "rc=1", "1"]
    assert any(x["resource"] == f"{LT}/w/secrets/s.txt" and x["decision"] == "deny" for x in _records(audit))


def test_no_cgroup_v2_is_refused_with_one_line(policy_dir, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    code, out, err = _in_namespace("umount -R /sys/fs/cgroup", policy_dir, audit)
    assert code != 0 and code != 7
    assert out == ""                                        # the command never ran
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "cgroup v2" in lines[0], err
    host = other_agent()                                    # and nothing was left holding the host
    try:
        assert host.run(f"result = try_open('{LT}/w/secrets/s.txt')") == 0
    finally:
        host.close()

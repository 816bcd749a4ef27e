"""`leash --policy DIR -- CMD` end to end with the lsm backend, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from harness import LT, POLICY, make_world, write_policy
from leash.audit import decode_records


def leash(tmp_path, *args, mode="enforce"):
    policy, log = str(tmp_path / "policy"), str(tmp_path / "audit.jsonl")
    write_policy(policy, POLICY)
    proc = subprocess.run([sys.executable, "-m", "leash", "--policy", policy, "--agent", "bot",
                           "--backend", "lsm", "--mode", mode, "--audit", log, "--", *args],
                          capture_output=True, text=True, cwd=os.getcwd(), timeout=300)
    with open(log, "rb") as f:
        return proc, decode_records(f.read())


def test_run_refuses_records_and_keeps_exit_status(tmp_path):
    make_world()
    proc, recs = leash(tmp_path, "/bin/sh", "-c", f"cat {LT}/w/ok.txt && cat {LT}/w/secrets/s.txt; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "ok"
    assert "Operation not permitted" in proc.stderr
    deny = [r for r in recs if r.decision == "deny" and r.resource == f"{LT}/w/secrets/s.txt"]
    assert deny and deny[0].policies == ["no-secrets"] and deny[0].backend == "lsm"
    assert any(r.decision == "allow" and r.resource == f"{LT}/w/ok.txt" for r in recs)


def test_run_audit_mode(tmp_path):
    make_world()
    proc, recs = leash(tmp_path, "/bin/cat", f"{LT}/w/secrets/s.txt", mode="audit")
    assert proc.returncode == 0 and proc.stdout == "secret", proc.stderr
    deny = [r for r in recs if r.decision == "deny" and r.resource == f"{LT}/w/secrets/s.txt"]
    assert deny and deny[0].mode == "audit"


def test_run_spares_leash_from_the_oom_killer_not_the_agent(tmp_path):
    # (the build machines' sandbox lacks CAP_SYS_RESOURCE; the VM's root has it)
    make_world()
    code = ("cat /proc/$PPID/oom_score_adj /proc/self/oom_score_adj; grep CapBnd /proc/self/status; "
            "echo -1000 > /proc/self/oom_score_adj || echo refused")
    proc, _ = leash(tmp_path, "/bin/sh", "-c", code)
    assert proc.returncode == 0, proc.stderr
    daemon, agent, bounding, lowered = proc.stdout.splitlines()
    assert (daemon, agent) == ("-1000", "0")
    assert bounding.split() == ["CapBnd:", "00000000a00005fb"]
    assert lowered == "refused"

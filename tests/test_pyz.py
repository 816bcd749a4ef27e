"""The one-file build: tools/build-pyz makes dist/leash.pyz, and it runs the
same CLI as `python -m leash`, with the schema, demo policy and BPF objects
inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYZ = os.path.join(REPO, "dist", "leash.pyz")


def test_pyz_builds_and_runs_the_same_cli(tmp_path):
    build = subprocess.run([os.path.join(REPO, "tools", "build-pyz")], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    names = zipfile.ZipFile(PYZ).namelist()
    for wanted in ("leash/policy/leash.cedarschema", "leash/demo/policy/default.cedar",
                   "leash/demo/agent.sh", "leash/kernel/objects/lsm_file.bpf.o",
                   "leash/kernel/objects/compat_net.bpf.o"):
        assert any(n.endswith(wanted) for n in names), wanted
    demo_policy = os.path.join(REPO, "leash", "demo", "policy")
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
    from_pyz = subprocess.run([PYZ, "check", "--policy", demo_policy, "--json"],
                              capture_output=True, text=True, timeout=300, env=env)
    from_module = subprocess.run([sys.executable, "-m", "leash", "check", "--policy", demo_policy, "--json"],
                                 capture_output=True, text=True, timeout=300, cwd=REPO)
    assert from_pyz.returncode == 0, from_pyz.stderr
    assert from_pyz.stdout == from_module.stdout

"""The kernel suite (tests/kernel_lsm) run inside a VM booting Debian's
stock kernel, where BPF LSM programs load (the build machines' kernel
refuses them). The VM boots once per pytest session; each in-VM test is
reported here as its own test, and a VM that fails to boot or report fails
every one of them (never a skip)."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "tests", "kernel_lsm")

pytestmark = pytest.mark.vm


def in_vm_tests() -> list[str]:
    """tests/kernel_lsm/test_x.py::test_y for every module-level test, those a
    module imports (the shared scenarios) included, read from the source so
    collection does not need the VM."""
    ids = []
    for path in sorted(glob.glob(os.path.join(SUITE, "test_*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read())
        rel = os.path.relpath(path, REPO)
        names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
        names += [alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                  for alias in node.names]
        ids += [f"{rel}::{name}" for name in names if name.startswith("test_")]
    return ids


class VmRun:
    def __init__(self, status: int, output: str, results: dict[str, tuple[str, str]]) -> None:
        self.status, self.output, self.results = status, output, results


@pytest.fixture(scope="session")
def vm_run(tmp_path_factory) -> VmRun:
    results = tmp_path_factory.mktemp("vm")
    junit = results / "junit.xml"
    cmd = [sys.executable, os.path.join(REPO, "tools", "vm", "run"), "--results", str(results), "--",
           sys.executable, "-m", "pytest", "tests/kernel_lsm", "-p", "no:cacheprovider", "-q",
           "-o", "addopts=", "--junitxml", str(junit)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    outcomes: dict[str, tuple[str, str]] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            module = case.get("classname", "").replace(".", "/")
            # a parametrized test is reported once: passed only if every case passed
            name, _, params = case.get("name", "").partition("[")
            nodeid = f"{module}.py::{name}"
            outcome, detail = "passed", ""
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is not None:
                    outcome = kind
                    detail = (f"[{params} " if params else "") + (el.get("message") or "") + "\n" + (el.text or "")
                    break
            if outcomes.get(nodeid, ("passed", ""))[0] == "passed":
                outcomes[nodeid] = (outcome, detail)
    return VmRun(proc.returncode, proc.stdout + proc.stderr, outcomes)


@pytest.mark.parametrize("nodeid", in_vm_tests())
def test_in_vm(vm_run: VmRun, nodeid: str) -> None:
    if nodeid not in vm_run.results:
        pytest.fail(f"{nodeid} did not run in the VM (status {vm_run.status}):\n{vm_run.output[-4000:]}")
    outcome, detail = vm_run.results[nodeid]
    if outcome != "passed":
        pytest.fail(f"{outcome} in the VM:\n{detail[-6000:]}")


def test_vm_suite_passed_as_a_whole(vm_run: VmRun) -> None:
    assert vm_run.status == 0, vm_run.output[-6000:]
    assert set(vm_run.results) == set(in_vm_tests())

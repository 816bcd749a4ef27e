"""The kernel suite runs INSIDE the test VM (tools/vm/run, driven by
tests/test_lsm_vm.py), where BPF LSM programs load. Outside the VM it is not
collected at all: tests/test_lsm_vm.py reports these results on the host."""

import os

if not os.environ.get("LEASH_VM_RESULTS"):
    collect_ignore_glob = ["*.py"]

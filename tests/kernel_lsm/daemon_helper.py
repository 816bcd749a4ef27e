"""A stand-in leash daemon for the SIGKILL test: start the lsm backend,
govern one cgroup, say "ready", wait to be killed."""

import os
import sys
import time

sys.path.insert(0, os.getcwd())

from harness import AGENTS, compile_dir  # noqa: E402
from leash.kernel.lsm import LsmBackend  # noqa: E402


def main() -> None:
    policy_dir, cgroup_path = sys.argv[1:3]
    backend = LsmBackend(protected_paths=[policy_dir])
    backend.start(compile_dir(policy_dir), "enforce", lambda rec: None)
    backend.govern(AGENTS["bot"], cgroup_path)
    print("ready", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()

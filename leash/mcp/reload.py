"""The policy in force for a gateway, reloaded when its directory changes.

`current()` is called before each message is decided: it compares a cheap
signature of the directory (one stat per file, ~10 µs) with the one the
policy was loaded from, so an edit applies to the very next message without a
watcher thread. SIGHUP (`request_reload`) reloads at once, even when the
signature did not change (an edit within the file system's timestamp
granularity that kept the size). A policy that fails to load never replaces the one
in force; the failure is reported once per distinct signature.
"""

from __future__ import annotations

import os
from typing import Callable

from leash.policy.loader import LoadedPolicy, PolicyLoadError, load_policy_dir

Signature = tuple


class PolicySource:
    def __init__(self, directory: str,
                 on_reload: Callable[[LoadedPolicy], None],
                 on_reload_error: Callable[[PolicyLoadError], None]) -> None:
        """Loads the policy now; raises PolicyLoadError if it does not load."""
        self.directory = directory
        self._on_reload = on_reload
        self._on_reload_error = on_reload_error
        self._forced = False
        self._signature = _signature(directory)
        self.policy = load_policy_dir(directory)

    def request_reload(self) -> None:
        """Reload now, even if no file looks changed (SIGHUP)."""
        self._forced = True
        self.current()

    def current(self) -> LoadedPolicy:
        signature = _signature(self.directory)
        if signature == self._signature and not self._forced:
            return self.policy
        self._forced = False
        self._signature = signature
        try:
            policy = load_policy_dir(self.directory)
        except PolicyLoadError as e:
            self._on_reload_error(e)
            return self.policy
        self.policy = policy
        self._on_reload(policy)
        return policy


def _signature(directory: str) -> Signature:
    """What changes whenever a policy file or leash.toml is written, renamed,
    added or removed. Editors that replace a file by rename change its inode."""
    try:
        entries = sorted(
            (e.name, st.st_ino, st.st_size, st.st_mtime_ns)
            for e in os.scandir(directory)
            if e.name.endswith(".cedar") or e.name == "leash.toml"
            for st in (e.stat(),))
    except OSError as e:
        return (("error", e.errno),)
    return tuple(entries)

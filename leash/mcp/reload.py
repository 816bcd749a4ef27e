"""The policy in force for a standalone gateway (wrap, proxy), reloaded when
its directory changes. (A daemon-hosted session decides with the daemon's
policy instead, which the daemon reloads.)

`current()` is called before each message is decided: it compares a cheap
signature of the directory (one stat per file, ~10 µs) with the one the
policy was loaded from, so an edit applies to the very next message without a
watcher thread. SIGHUP (`request_reload`) reloads at once, even when the
signature did not change (an edit within the file system's timestamp
granularity that kept the size). A policy that fails to load never replaces the one
in force; the failure is recorded once per distinct signature, as is every
successful reload.
"""

from __future__ import annotations

import os
from typing import Callable

from leash.audit import AuditRecord, now_ns
from leash.policy.loader import LoadedPolicy, PolicyLoadError, load_policy_dir

Signature = tuple


class PolicySource:
    def __init__(self, directory: str, sink: Callable[[AuditRecord], None], agent: str, mode: str) -> None:
        """Loads the policy now; raises PolicyLoadError if it does not load.
        Reloads are recorded to `sink` as the gateway's (`agent`, `mode`)."""
        self.directory = directory
        self._sink = sink
        self._agent = agent
        self._mode = mode
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
            self._record("deny", "policy reload failed; the previous policy stays in force: " + str(e), {})
            return self.policy
        self.policy = policy
        self._record("allow", "policy reloaded", {"fingerprint": policy.fingerprint})
        return policy

    def _record(self, decision: str, reason: str, details: dict) -> None:
        self._sink(AuditRecord(time_ns=now_ns(), agent=self._agent, action="Internal",
                               resource=f"policy:{self.directory}", decision=decision, backend="mcp",
                               mode=self._mode, reason=reason, details=details))


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

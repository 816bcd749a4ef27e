"""The contract both kernel backends implement, and the probe that picks one.

    select_backend(None)       lsm where BPF LSM programs load, compat otherwise
    select_backend("lsm")      lsm, or BackendUnavailable with the one-line reason
    select_backend("compat")   compat
    probe_lsm()                LsmProbe(ok, reason): what `leash doctor` prints
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Protocol

import msgspec

from leash.audit import AuditRecord
from leash.policy.tables import DecisionTables

BTF_PATH = "/sys/kernel/btf/vmlinux"
SECURITYFS = "/sys/kernel/security"
COMPAT_HINT = "use the compat backend (--backend compat)"


class Backend(Protocol):
    name: str

    def start(self, tables: DecisionTables, mode: str, sink: Callable[[AuditRecord], None]) -> None: ...
    def update(self, tables: DecisionTables) -> None: ...
    def govern(self, agent_id: int, cgroup_path: str) -> None: ...
    def stop(self) -> None: ...
    def agent_of_pid(self, pid: int) -> int: ...     # the agent id process `pid` is governed as, 0 if none


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run on this kernel; str() is the one-line reason."""


class LsmProbe(msgspec.Struct, frozen=True):
    ok: bool
    reason: str                        # why not (empty when ok)
    active_lsms: str = ""              # the kernel's LSM list, when readable


def active_lsms() -> str | None:
    """The kernel's active LSM list (mounts securityfs when it is not)."""
    path = os.path.join(SECURITYFS, "lsm")
    if not os.path.exists(path) and not os.path.ismount(SECURITYFS):
        subprocess.run(["mount", "-t", "securityfs", "securityfs", SECURITYFS],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


_probe_cache: LsmProbe | None = None


def probe_lsm() -> LsmProbe:
    """Can this kernel run the lsm backend? Loads one real LSM program to be
    sure: some kernels list `bpf` among their LSMs and still refuse them."""
    global _probe_cache
    if _probe_cache is None:
        _probe_cache = _probe()
    return _probe_cache


def _probe() -> LsmProbe:
    from leash.kernel import libbpf, objects

    if not os.path.exists(BTF_PATH):
        return LsmProbe(False, f"this kernel has no BTF ({BTF_PATH} missing, needs "
                               f"CONFIG_DEBUG_INFO_BTF): {COMPAT_HINT}")
    lsms = active_lsms()
    if lsms is None:
        return LsmProbe(False, f"cannot read the active LSM list ({SECURITYFS}/lsm): {COMPAT_HINT}")
    if "bpf" not in lsms.split(","):
        return LsmProbe(False, f"BPF LSM is not active (active LSMs: {lsms}; boot with "
                               f"lsm={lsms},bpf to enable it): {COMPAT_HINT}", lsms)
    try:
        obj = libbpf.Object(objects.load_bytes("lsm_self"), "lsm_self")
    except (libbpf.LibbpfMissing, FileNotFoundError) as e:
        return LsmProbe(False, f"{e}", lsms)
    try:
        for name, prog in obj.programs.items():
            prog.set_autoload(name == "leash_bpf")
        obj.load()
    except libbpf.BpfError as e:
        if e.errno == 1 and not any("verifier" in line or "R0" in line for line in e.log):
            why = ("the kernel refuses to load BPF LSM programs (EPERM with an empty verifier "
                   "log: kernel lockdown or a build-time restriction, not something userspace "
                   "can change)")
        else:
            why = f"loading a BPF LSM program failed: {os.strerror(e.errno)}"
        return LsmProbe(False, f"{why}: {COMPAT_HINT}", lsms)
    finally:
        obj.close()
    return LsmProbe(True, "", lsms)


def select_backend(forced: str | None = None, **options: object) -> Backend:
    """The backend to run: `forced` ("lsm" | "compat") or the best this kernel
    supports. `options` go to the backend's constructor (protected_paths=...)."""
    if forced not in (None, "lsm", "compat"):
        raise ValueError(f"unknown backend {forced!r} (lsm or compat)")
    if forced != "compat":
        probe = probe_lsm()
        if probe.ok:
            from leash.kernel.lsm import LsmBackend
            return LsmBackend(**options)
        if forced == "lsm":
            raise BackendUnavailable(probe.reason)
    from leash.kernel.compat import CompatBackend
    return CompatBackend(**options)

"""`leash doctor`: what this host supports, mechanism by mechanism, and which
backend leash would use here."""

from __future__ import annotations

import os
import platform

import msgspec


class Probe(msgspec.Struct):
    name: str
    ok: bool
    detail: str


class DoctorReport(msgspec.Struct):
    kernel: str
    probes: list[Probe]
    lsm_backend: Probe
    compat_backend: Probe
    usable_backend: str                # "lsm" | "compat" | "" (none)


def _host_probes() -> list[Probe]:
    """What both backends need; each backend's probe adds its own mechanisms."""
    from leash.kernel.backend import active_lsms
    out = [Probe("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0
                 else "leash needs root to load BPF programs and answer fanotify events")]
    lsms = active_lsms()
    out.append(Probe("bpf among active LSMs", lsms is not None and "bpf" in lsms.split(","),
                     lsms if lsms is not None else "cannot read /sys/kernel/security/lsm"))
    return out


def run_probes() -> DoctorReport:
    from leash.kernel.backend import probe_lsm
    from leash.kernel.compat import probe_compat
    probes = _host_probes()
    lsm = probe_lsm()
    lsm_probe = Probe("lsm backend", lsm.ok, "BPF LSM programs load here" if lsm.ok else lsm.reason)
    compat_results = probe_compat()
    probes += [Probe(f"compat: {p.name}", p.ok, p.detail) for p in compat_results]
    compat_ok = all(p.ok for p in compat_results)
    failed = [p for p in compat_results if not p.ok]
    compat_probe = Probe("compat backend", compat_ok,
                         "cgroup sock_addr + fanotify + tp_btf all work here" if compat_ok
                         else "; ".join(f"{p.name}: {p.detail}" for p in failed))
    usable = "lsm" if lsm.ok else ("compat" if compat_ok else "")
    return DoctorReport(platform.release(), probes, lsm_probe, compat_probe, usable)


def human(r: DoctorReport) -> str:
    lines = [f"kernel {r.kernel}"]
    for p in r.probes + [r.lsm_backend, r.compat_backend]:
        lines.append(f"  [{'ok' if p.ok else 'no'}] {p.name}: {p.detail}")
    lines.append(f"leash would use: {r.usable_backend or 'no backend (see above)'}")
    return "\n".join(lines)

"""The compiled BPF objects shipped inside the package.

bpf/src/ is the source; tools/build-bpf compiles it into bpf/prebuilt/ (the
committed build CI compares against a fresh one) and copies the same bytes
into leash/kernel/objects/, which is what an installed package or leash.pyz
loads from memory here. Nothing is read from outside the package.
"""

from __future__ import annotations

from importlib import resources

SCOPE = "scope"                                   # tp_btf fork/exec/exit: both backends
LSM = ("lsm_file", "lsm_exec", "lsm_net", "lsm_self", "lsm_mount")   # loaded after SCOPE by lsm
COMPAT = ("compat_tasks", "compat_net", "compat_mounts", "compat_sockets")   # loaded after SCOPE by compat


def load_bytes(name: str) -> bytes:
    """The bytes of `<name>.bpf.o`; FileNotFoundError names the missing object."""
    path = resources.files("leash.kernel").joinpath("objects", f"{name}.bpf.o")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"BPF object {name}.bpf.o is not in the package "
                                "(run tools/build-bpf)") from None

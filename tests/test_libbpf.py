"""The libbpf binding, the embedded objects and the backend probe on the
build machine's own kernel (root; no LSM needed)."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest

from leash.kernel import backend, libbpf, objects
from leash.policy import tables as tbl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF needs root")


def test_libbpf_version():
    major, minor = (int(x) for x in libbpf.version().split("."))
    assert (major, minor) >= libbpf.MIN_VERSION


def test_missing_libbpf_is_explained(monkeypatch):
    def no_lib(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(libbpf, "_lib", None)
    monkeypatch.setattr(libbpf.ctypes, "CDLL", no_lib)
    with pytest.raises(libbpf.LibbpfMissing, match="libbpf.so.1 not found: install libbpf 1.x"):
        libbpf.lib()


def test_every_object_is_embedded():
    for name in (objects.SCOPE, *objects.LSM):
        assert objects.load_bytes(name)[:4] == b"\x7fELF"
    with pytest.raises(FileNotFoundError, match="nope.bpf.o"):
        objects.load_bytes("nope")


@needs_root
def test_scope_object_loads_and_tables_answer_longest_prefix():
    """tp_btf programs load on this kernel; its LPM maps answer the lookups
    the hooks make with the keys tables.py encodes."""
    obj = libbpf.Object(objects.load_bytes(objects.SCOPE), objects.SCOPE)
    try:
        obj.maps["leash_paths"].set_max_entries(64)
        obj.load()
        paths = obj.maps["leash_paths"]
        for path, exact, cls in (("/", False, 1), ("/w/", False, 2), ("/w/secrets/", False, 3),
                                 ("/w/key", True, 4)):
            paths.update(tbl.encode_path_key(0, 7, path, exact), tbl.encode_path_value(cls, cls))
        paths.update(tbl.encode_path_key(1, 7, "/w/", False), tbl.encode_path_value(9, 9))

        def lookup(gen, path):
            data = path.encode() + b"\0"
            key = (struct.pack("<I", 32 + 8 * 252) + tbl.owner_word(gen, 7) + data.ljust(252, b"\0"))
            v = paths.lookup(key)
            return struct.unpack("<II", v)[0] if v else None

        assert lookup(0, "/w/secrets/a") == 3
        assert lookup(0, "/w/key") == 4
        assert lookup(0, "/w/keys") == 2
        assert lookup(0, "/etc/passwd") == 1
        assert lookup(1, "/w/x") == 9 and lookup(1, "/etc") is None   # generations never mix
        assert len(list(paths.keys())) == 5
        assert paths.delete(tbl.encode_path_key(1, 7, "/w/", False))
        assert not paths.delete(tbl.encode_path_key(1, 7, "/w/", False))
        link = obj.programs["leash_fork"].attach()
        link.destroy()
    finally:
        obj.close()


@needs_root
def test_bpf_errors_carry_errno_and_log():
    obj = libbpf.Object(objects.load_bytes("lsm_self"), "lsm_self")
    try:
        with pytest.raises(libbpf.BpfError) as e:
            obj.maps["leash_paths"].update(b"short", b"x")    # not loaded: no fd
        assert e.value.errno
    finally:
        obj.close()


@needs_root
def test_probe_explains_this_host():
    probe = backend.probe_lsm()
    if probe.ok:
        assert backend.select_backend("lsm").name == "lsm"
    else:
        assert backend.COMPAT_HINT in probe.reason
        with pytest.raises(backend.BackendUnavailable, match="compat"):
            backend.select_backend("lsm")


def test_committed_objects_match_sources():
    proc = subprocess.run([os.path.join(REPO, "tools", "build-bpf"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

"""A thin ctypes binding to the system libbpf.so.1 (>= 1.0): open an object
from memory, size and share maps, load, attach (LSM, tracing, cgroup), pin
links, read and write maps, consume a ring buffer. Shared by both kernel
backends. Every failure raises BpfError carrying errno and libbpf's own log
lines (the verifier's output among them)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import threading
from collections.abc import Callable, Iterator

MIN_VERSION = (1, 0)
BPF_ANY = 0


class LibbpfMissing(RuntimeError):
    """libbpf.so.1 is absent or too old; the message says what to install."""


class BpfError(OSError):
    def __init__(self, err: int, what: str, log: list[str] | None = None) -> None:
        self.log = log or []
        detail = "".join(f"\n  {line}" for line in self.log[-30:])
        super().__init__(err, f"{what}: {os.strerror(err)}{detail}")


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_log_local = threading.local()

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]


_LIBBPF_DEBUG = 2


def _on_print(level: int, fmt: bytes, args: int) -> int:
    if level >= _LIBBPF_DEBUG:
        return 0
    # one message can carry a whole verifier log, whose end says what failed
    buf = ctypes.create_string_buffer(1 << 20)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    lines = getattr(_log_local, "lines", None)
    if lines is not None:
        lines.extend(line for line in buf.value.decode(errors="replace").splitlines() if line.strip())
    return 0


_print_cb = _PRINT_FN(_on_print)      # kept alive for the life of the process


class _Log:
    """Collect libbpf's messages printed during one call, on this thread."""

    def __enter__(self) -> list[str]:
        _log_local.lines = []
        return _log_local.lines

    def __exit__(self, *exc: object) -> None:
        _log_local.lines = None


_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_major_version": (ctypes.c_uint32, []),
    "libbpf_minor_version": (ctypes.c_uint32, []),
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "bpf_object__open_mem": (_P, [ctypes.c_char_p, ctypes.c_size_t, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_program__name": (ctypes.c_char_p, [_P]),
    "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_program__attach_cgroup": (_P, [_P, ctypes.c_int]),
    "bpf_link__pin": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "bpf_link__unpin": (ctypes.c_int, [_P]),
    "bpf_link__destroy": (ctypes.c_int, [_P]),
    "bpf_map__name": (ctypes.c_char_p, [_P]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "bpf_map__reuse_fd": (ctypes.c_int, [_P, ctypes.c_int]),
    "bpf_map__set_max_entries": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "bpf_map__max_entries": (ctypes.c_uint32, [_P]),
    "bpf_map__key_size": (ctypes.c_uint32, [_P]),
    "bpf_map__value_size": (ctypes.c_uint32, [_P]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]),
    "ring_buffer__new": (_P, [ctypes.c_int, _SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (ctypes.c_int, [_P, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
}


def lib() -> ctypes.CDLL:
    """The loaded libbpf, checked for version and every symbol we use."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        try:
            handle = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise LibbpfMissing(
                "libbpf.so.1 not found: install libbpf 1.x (Debian/Ubuntu: libbpf1, "
                f"Fedora: libbpf) ({e})") from None
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(handle, name)
            except AttributeError:
                raise LibbpfMissing(f"libbpf.so.1 lacks {name}: install libbpf >= "
                                    f"{MIN_VERSION[0]}.{MIN_VERSION[1]}") from None
            fn.restype = restype
            fn.argtypes = argtypes
        version = (handle.libbpf_major_version(), handle.libbpf_minor_version())
        if version < MIN_VERSION:
            raise LibbpfMissing(f"libbpf {version[0]}.{version[1]} is too old: leash needs "
                                f">= {MIN_VERSION[0]}.{MIN_VERSION[1]}")
        handle.libbpf_set_print(_print_cb)
        _lib = handle
        return handle


def version() -> str:
    lb = lib()
    return f"{lb.libbpf_major_version()}.{lb.libbpf_minor_version()}"


def _check_ptr(ptr: int | None, what: str, log: list[str]) -> int:
    if not ptr:
        raise BpfError(ctypes.get_errno() or _errno.EINVAL, what, list(log))
    return ptr


def _check_rc(rc: int, what: str, log: list[str] | None = None) -> None:
    if rc < 0:
        raise BpfError(-rc, what, list(log or []))


class _OpenOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p)]


class Link:
    def __init__(self, ptr: int, what: str) -> None:
        self._ptr: int | None = ptr
        self.what = what
        self.pinned: str | None = None

    def pin(self, path: str) -> None:
        with _Log() as log:
            _check_rc(lib().bpf_link__pin(self._ptr, path.encode()), f"pin {self.what} at {path}", log)
        self.pinned = path

    def destroy(self) -> None:
        """Detach (unpinning first, so nothing keeps the program attached)."""
        if self._ptr is None:
            return
        if self.pinned:
            lib().bpf_link__unpin(self._ptr)
            self.pinned = None
        lib().bpf_link__destroy(self._ptr)
        self._ptr = None


class Program:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self.name = lib().bpf_program__name(ptr).decode()

    def set_autoload(self, on: bool) -> None:
        _check_rc(lib().bpf_program__set_autoload(self._ptr, on), f"set_autoload {self.name}")

    def attach(self) -> Link:
        with _Log() as log:
            ptr = lib().bpf_program__attach(self._ptr)
            return Link(_check_ptr(ptr, f"attach {self.name}", log), self.name)

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        with _Log() as log:
            ptr = lib().bpf_program__attach_cgroup(self._ptr, cgroup_fd)
            return Link(_check_ptr(ptr, f"attach {self.name} to cgroup", log), self.name)


class Map:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self.name = lib().bpf_map__name(ptr).decode()

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self._ptr)

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self._ptr)

    def set_max_entries(self, n: int) -> None:
        _check_rc(lib().bpf_map__set_max_entries(self._ptr, n), f"size map {self.name}")

    def reuse_fd(self, fd: int) -> None:
        """Before load: use an existing map (another object's) instead of creating one."""
        _check_rc(lib().bpf_map__reuse_fd(self._ptr, fd), f"reuse map {self.name}")

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        map_update(self.fd, key, value, flags, self.name)

    def lookup(self, key: bytes) -> bytes | None:
        return map_lookup(self.fd, key, self.value_size)

    def delete(self, key: bytes) -> bool:
        return map_delete(self.fd, key)

    def keys(self) -> Iterator[bytes]:
        return map_keys(self.fd, self.key_size)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY, name: str = "map") -> None:
    _check_rc(lib().bpf_map_update_elem(fd, key, value, flags), f"update {name}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, key, buf)
    if rc == -_errno.ENOENT:
        return None
    _check_rc(rc, "map lookup")
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    rc = lib().bpf_map_delete_elem(fd, key)
    if rc == -_errno.ENOENT:
        return False
    _check_rc(rc, "map delete")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, read before yielding so deletions while iterating are safe."""
    keys: list[bytes] = []
    prev: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        rc = lib().bpf_map_get_next_key(fd, prev, nxt)
        if rc == -_errno.ENOENT:
            break
        _check_rc(rc, "map iterate")
        prev = nxt.raw
        keys.append(prev)
    return iter(keys)


class Object:
    """One BPF object opened from bytes; close() detaches nothing by itself
    (links are separate) but frees programs and maps it still owns."""

    def __init__(self, data: bytes, name: str) -> None:
        self.name = name
        self._data = data          # libbpf keeps pointers into the buffer until load
        opts = _OpenOpts(ctypes.sizeof(_OpenOpts), name.encode())
        with _Log() as log:
            ptr = lib().bpf_object__open_mem(data, len(data), ctypes.byref(opts))
            self._ptr: int | None = _check_ptr(ptr, f"open BPF object {name}", log)
        self.programs: dict[str, Program] = {}
        p = lib().bpf_object__next_program(self._ptr, None)
        while p:
            prog = Program(p)
            self.programs[prog.name] = prog
            p = lib().bpf_object__next_program(self._ptr, p)
        self.maps: dict[str, Map] = {}
        m = lib().bpf_object__next_map(self._ptr, None)
        while m:
            mp = Map(m)
            self.maps[mp.name] = mp
            m = lib().bpf_object__next_map(self._ptr, m)

    def load(self) -> None:
        with _Log() as log:
            _check_rc(lib().bpf_object__load(self._ptr), f"load BPF object {self.name}", log)

    def close(self) -> None:
        if self._ptr is not None:
            lib().bpf_object__close(self._ptr)
            self._ptr = None


class RingBuffer:
    """Consumes one BPF ring buffer; `callback(bytes)` runs on the polling thread."""

    def __init__(self, map_fd: int, callback: Callable[[bytes], None]) -> None:
        def sample(_ctx: int, data: int, size: int) -> int:
            callback(ctypes.string_at(data, size))
            return 0

        self._cb = _SAMPLE_FN(sample)
        with _Log() as log:
            ptr = lib().ring_buffer__new(map_fd, self._cb, None, None)
            self._ptr: int | None = _check_ptr(ptr, "ring buffer", log)

    def poll(self, timeout_ms: int) -> int:
        rc = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if rc == -_errno.EINTR:
            return 0
        _check_rc(rc, "ring buffer poll")
        return rc

    def consume(self) -> int:
        rc = lib().ring_buffer__consume(self._ptr)
        _check_rc(rc, "ring buffer consume")
        return rc

    def free(self) -> None:
        if self._ptr is not None:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None

"""Compiled decision tables: plain data, and their kernel encoding.

The compiler fills a `DecisionTables`; the kernel backends write its rows into
BPF maps with the `encode_*` functions here; `explain` and the compat backend's
userspace slow path answer from the same rows with `PathIndex` / `NetIndex`.
docs/tables.md is the byte-level contract with bpf/src/.
"""

from __future__ import annotations

import ipaddress
import struct

import msgspec

# Kernel-enforced actions, in the order their verdicts are stored.
FILE_READ = "FileOpenReadOnly"
FILE_WRITE = "FileOpenReadWrite"
EXEC = "ProcessExec"
CONNECT = "NetworkConnect"
KERNEL_ACTIONS = (FILE_READ, FILE_WRITE, EXEC, CONNECT)

# path_val.allow bits (docs/tables.md).
ALLOW_READ_FILE = 1 << 0
ALLOW_WRITE_FILE = 1 << 1
ALLOW_EXEC = 1 << 2
ALLOW_READ_DIR = 1 << 3
ALLOW_WRITE_DIR = 1 << 4

PATH_DATA_BYTES = 252          # path bytes in a path_key
MAX_POLICY_PATH = 250          # longest distinguished path (251 with a Dir's '/')
PROTO_TCP = 6
PROTO_UDP = 17
PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}


class PolicyInfo(msgspec.Struct, frozen=True):
    """One policy as the user wrote it, for audit records and errors."""
    id: str
    file: str
    line: int
    effect: str


class Verdict(msgspec.Struct, frozen=True):
    """One Cedar answer: allow or not, and the policies that determined it
    (indices into DecisionTables.policies)."""
    allow: bool
    policies: tuple[int, ...] = ()


class PathRule(msgspec.Struct, frozen=True):
    """An LPM entry: a distinguished directory prefix (path ends in '/',
    exact False) or an exact file/directory (exact True)."""
    agent: int
    path: str
    exact: bool
    path_class: int


class PathClass(msgspec.Struct, frozen=True):
    """Verdict ids (into DecisionTables.verdicts) of one path class, -1 where
    the combination cannot occur (executing a directory)."""
    read_file: int
    write_file: int
    exec_file: int
    read_dir: int
    write_dir: int
    representative: str

    def verdict_for(self, action: str, is_dir: bool) -> int:
        if action == FILE_READ:
            return self.read_dir if is_dir else self.read_file
        if action == FILE_WRITE:
            return self.write_dir if is_dir else self.write_file
        if action == EXEC:
            return -1 if is_dir else self.exec_file
        raise ValueError(f"not a file action: {action}")


class AddrRule(msgspec.Struct, frozen=True):
    """An LPM entry of the address table: CIDR -> network class."""
    agent: int
    cidr: str                  # "10.0.0.0/8", "::1/128"
    net_class: int


class NameRule(msgspec.Struct, frozen=True):
    """A host-name class entry: an exact name or a '*.zone' suffix. Used for
    names learnt from DNS (explain today, the kernel's learnt-name table later)."""
    agent: int
    name: str                  # "api.github.com" or "*.github.com"
    net_class: int


class PortRule(msgspec.Struct, frozen=True):
    """An LPM entry of the port table: a power-of-two block of ports of one
    protocol within a network class."""
    net_class: int
    proto: int
    port: int
    prefix_bits: int           # 0..16
    verdict: int               # index into DecisionTables.verdicts


class NetClass(msgspec.Struct, frozen=True):
    """A network class: the set of destinations every policy treats alike
    apart from port and protocol (shared by agents whose columns agree)."""
    kind: str                  # "addr" | "name"
    representative: str        # address or host name asked of Cedar


class DecisionTables(msgspec.Struct):
    """Everything the kernel and explain need, for one generation of policy."""
    agents: dict[str, int]                 # agent name -> agent id (>= 1)
    other_agent: int                       # column used for names not in `agents`
    policies: list[PolicyInfo]
    verdicts: list[Verdict]
    path_rules: list[PathRule]
    path_classes: list[PathClass]
    addr_rules: list[AddrRule]
    name_rules: list[NameRule]
    net_classes: list[NetClass]
    port_rules: list[PortRule]
    cedar_requests: int = 0                # representatives Cedar was asked about

    def policy_ids(self, verdict: int) -> list[str]:
        return [self.policies[i].id for i in self.verdicts[verdict].policies]


# ---------------------------------------------------------------- kernel encoding

def owner_word(generation: int, ident: int) -> bytes:
    return struct.pack(">I", (generation & 1) << 31 | ident)


def encode_path_key(generation: int, agent: int, path: str, exact: bool) -> bytes:
    data = path.encode() + (b"\0" if exact else b"")
    if len(data) > PATH_DATA_BYTES:
        raise ValueError(f"path too long for the kernel key: {path!r}")
    return (struct.pack("<I", 32 + 8 * len(data)) + owner_word(generation, agent)
            + data.ljust(PATH_DATA_BYTES, b"\0"))


def path_allow_bits(tables: DecisionTables, cls: PathClass) -> int:
    bits = 0
    for verdict, bit in ((cls.read_file, ALLOW_READ_FILE), (cls.write_file, ALLOW_WRITE_FILE),
                         (cls.exec_file, ALLOW_EXEC), (cls.read_dir, ALLOW_READ_DIR),
                         (cls.write_dir, ALLOW_WRITE_DIR)):
        if verdict >= 0 and tables.verdicts[verdict].allow:
            bits |= bit
    return bits


def encode_path_value(class_id: int, allow_bits: int) -> bytes:
    return struct.pack("<II", class_id, allow_bits)


def encode_addr_key(generation: int, agent: int, cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr)
    family = 4 if net.version == 4 else 6
    addr = net.network_address.packed.ljust(16, b"\0")
    return (struct.pack("<I", 32 + 8 + net.prefixlen) + owner_word(generation, agent)
            + bytes([family]) + addr)


def encode_addr_value(net_class: int) -> bytes:
    return struct.pack("<I", net_class)


def encode_port_key(generation: int, net_class: int, proto: int, port: int, prefix_bits: int) -> bytes:
    return (struct.pack("<I", 32 + 8 + prefix_bits) + owner_word(generation, net_class)
            + bytes([proto]) + struct.pack(">H", port))


def encode_port_value(class_id: int, allow: bool) -> bytes:
    return struct.pack("<II", class_id, 1 if allow else 0)


class KernelEntry(msgspec.Struct, frozen=True):
    map_name: str
    key: bytes
    value: bytes


def kernel_entries(tables: DecisionTables, generation: int) -> list[KernelEntry]:
    """Every map entry of one generation, for the agents in `tables.agents`."""
    out: list[KernelEntry] = []
    kernel_agents = set(tables.agents.values())
    for rule in tables.path_rules:
        if rule.agent in kernel_agents:
            cls = tables.path_classes[rule.path_class]
            out.append(KernelEntry("leash_paths",
                                   encode_path_key(generation, rule.agent, rule.path, rule.exact),
                                   encode_path_value(rule.path_class, path_allow_bits(tables, cls))))
    kernel_classes = set()
    for rule in tables.addr_rules:
        if rule.agent in kernel_agents:
            kernel_classes.add(rule.net_class)
            out.append(KernelEntry("leash_addrs", encode_addr_key(generation, rule.agent, rule.cidr),
                                   encode_addr_value(rule.net_class)))
    for rule in tables.port_rules:
        if rule.net_class in kernel_classes:
            out.append(KernelEntry("leash_ports",
                                   encode_port_key(generation, rule.net_class, rule.proto,
                                                   rule.port, rule.prefix_bits),
                                   encode_port_value(rule.verdict,
                                                     tables.verdicts[rule.verdict].allow)))
    return out


# ---------------------------------------------------------------- userspace lookup

class Answer(msgspec.Struct, frozen=True):
    """What the tables say about one event."""
    verdict: int                       # index into DecisionTables.verdicts
    table_class: str                   # human description of the class that matched


class TableIndex:
    """The kernel's longest-prefix lookups, done in userspace over the same
    rows: `explain`, the compat backend's fanotify path and tests use it."""

    def __init__(self, tables: DecisionTables) -> None:
        self.tables = tables
        self._paths = {(r.agent, r.path, r.exact): r.path_class for r in tables.path_rules}
        self._addrs: dict[tuple[int, int], dict[int, dict[int, int]]] = {}
        for r in tables.addr_rules:
            net = ipaddress.ip_network(r.cidr)
            by_len = self._addrs.setdefault((r.agent, net.version), {})
            by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = r.net_class
        self._addr_lens = {k: sorted(v, reverse=True) for k, v in self._addrs.items()}
        self._names = {(r.agent, r.name): r.net_class for r in tables.name_rules}
        self._ports = {(r.net_class, r.proto, r.port, r.prefix_bits): r.verdict for r in tables.port_rules}

    def agent_id(self, name: str) -> int:
        return self.tables.agents.get(name, self.tables.other_agent)

    def path(self, agent: int, action: str, path: str, is_dir: bool) -> Answer | None:
        """None: no rule at all (the kernel would fail closed)."""
        key = path + "/" if is_dir and not path.endswith("/") else path
        cls = self._paths.get((agent, key, True))
        desc = f"exact {key}"
        if cls is None:
            i = len(key)
            while cls is None and i > 0:
                i = key.rfind("/", 0, i)
                if i < 0:
                    break
                cls = self._paths.get((agent, key[:i + 1], False))
                desc = f"under {key[:i + 1]}"
        if cls is None:
            return None
        verdict = self.tables.path_classes[cls].verdict_for(action, is_dir)
        return Answer(verdict, desc) if verdict >= 0 else None

    def _port(self, net_class: int, port: int, proto: int) -> int | None:
        for bits in range(16, -1, -1):
            start = port & ~((1 << (16 - bits)) - 1) & 0xFFFF
            v = self._ports.get((net_class, proto, start, bits))
            if v is not None:
                return v
        return None

    def address(self, agent: int, ip: str, port: int, proto: int) -> Answer | None:
        addr = ipaddress.ip_address(ip)
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        bits = 32 if addr.version == 4 else 128
        table = self._addrs.get((agent, addr.version), {})
        for plen in self._addr_lens.get((agent, addr.version), ()):
            net = int(addr) >> (bits - plen) << (bits - plen) if plen else 0
            cls = table[plen].get(net)
            if cls is not None:
                v = self._port(cls, port, proto)
                suffix = "" if plen == bits else f"/{plen}"
                return None if v is None else Answer(
                    v, f"address {ipaddress.ip_address(net) if addr.version == 4 else ipaddress.IPv6Address(net)}{suffix}")
        return None

    def host(self, agent: int, name: str, port: int, proto: int) -> Answer | None:
        """A host name learnt from DNS (no address known)."""
        cls = self._names.get((agent, name))
        desc = f"name {name}"
        if cls is None:
            labels = name.split(".")
            for i in range(1, len(labels)):
                zone = "*." + ".".join(labels[i:])
                cls = self._names.get((agent, zone))
                if cls is not None:
                    desc = f"zone {zone}"
                    break
        if cls is None:
            cls = self._names.get((agent, ""))
            desc = "other names"
        if cls is None:
            return None
        v = self._port(cls, port, proto)
        return None if v is None else Answer(v, desc)

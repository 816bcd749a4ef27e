"""Audit records: one per decision, JSON Lines, the same shape for every
backend (lsm, compat, mcp). DESIGN.md section 4."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO

import msgspec


class AuditRecord(msgspec.Struct, omit_defaults=True):
    time_ns: int                       # wall clock, ns since the epoch
    agent: str
    action: str                        # FileOpenReadOnly | FileOpenReadWrite | ProcessExec | NetworkConnect | McpCall | SelfProtect | Internal
    resource: str                      # path, host:port, MCP tool, ...
    decision: str                      # "allow" | "deny"
    policies: list[str] = []           # ids of the determining policies
    backend: str = ""                  # lsm | compat | mcp
    mode: str = "enforce"              # enforce | audit (audit: a deny was recorded, not enforced)
    pid: int = 0
    ppid: int = 0
    uid: int = 0
    exe: str = ""
    count: int = 1                     # identical repeats folded into this record
    reason: str = ""                   # why, when not a plain policy decision
    details: dict[str, object] = {}    # backend-specific extras (MCP server/method/latency, ...)


_encoder = msgspec.json.Encoder()


def now_ns() -> int:
    return time.time_ns()


def human_line(rec: AuditRecord) -> str:
    """The one-line stderr form of a deny."""
    who = f"{rec.agent}[{rec.pid}]" if rec.pid else rec.agent
    why = ", ".join(rec.policies) if rec.policies else (rec.reason or "no permit matched")
    verb = "would deny" if rec.mode == "audit" else "denied"
    return f"leash: {verb} {who} {rec.action} {rec.resource} ({why})"


class AuditLog:
    """Thread-safe JSON Lines writer; denies also go to stderr as one human line."""

    def __init__(self, path: str | None, stderr: IO[str] | None = sys.stderr) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "ab", buffering=0) if path else None
        self._stderr = stderr
        self.written = 0

    def write(self, rec: AuditRecord, echo: bool = True) -> None:
        """`echo`: a deny also goes to stderr as one human line."""
        line = _encoder.encode(rec) + b"\n"
        with self._lock:
            if self._file is not None:
                os.write(self._file.fileno(), line)
            self.written += 1
            if echo and rec.decision == "deny" and self._stderr is not None:
                print(human_line(rec), file=self._stderr, flush=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def decode_records(data: bytes) -> list[AuditRecord]:
    return [msgspec.json.decode(line, type=AuditRecord) for line in data.splitlines() if line.strip()]

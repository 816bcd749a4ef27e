"""The enforcer: load the policy, start a kernel backend, govern agents, keep
the policy live, record every decision, and shut down cleanly.

    leash --policy DIR                 govern the agents named in DIR/leash.toml
    leash --policy DIR -- CMD ARGS     run CMD as a governed agent, exit with its status
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import leash
from leash import capabilities, oom
from leash.audit import AuditLog, AuditRecord, now_ns
from leash.policy.compiler import AnswerCache, CompileError, compile_tables
from leash.policy.loader import LoadedPolicy, PolicyLoadError, load_policy_dir
from leash.policy.tables import DecisionTables

EXIT_BAD_INPUT = 2
EXIT_UNSUPPORTED = 1
WATCH_INTERVAL_S = 0.2


def _say(msg: str) -> None:
    print(f"leash: {msg}", file=sys.stderr, flush=True)


class AgentRegistry:
    """Agent name -> id, stable for the daemon's life (kernel scope maps hold ids)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def add(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = max([0, *self.ids.values()]) + 1
        return self.ids[name]

    def absorb(self, tables: DecisionTables) -> None:
        self.ids.update(tables.agents)


def _dir_state(directory: str) -> tuple:
    """What the watcher compares: every file's name, mtime and size."""
    try:
        return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                            for e in os.scandir(directory) if e.is_file()))
    except OSError as e:
        return (("<error>", e.errno, 0),)


class PolicyKeeper:
    """Holds the policy in force; reloads on change or SIGHUP. A bad new policy
    is refused with its errors recorded, and the old one stays in force."""

    def __init__(self, directory: str, registry: AgentRegistry, backend, audit: AuditLog) -> None:
        self.directory = directory
        self.registry = registry
        self.backend = backend
        self.audit = audit
        self.policy: LoadedPolicy | None = None
        self.tables: DecisionTables | None = None
        self.answers = AnswerCache()
        self._state = _dir_state(directory)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0

    def load_initial(self) -> None:
        """Raises PolicyLoadError / CompileError."""
        self.policy = load_policy_dir(self.directory)
        self.tables = compile_tables(self.policy, self.registry.ids, self.answers)
        self.registry.absorb(self.tables)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="leash-policy-watch", daemon=True)
        self._thread.start()

    def request_reload(self) -> None:
        self._state = None
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(WATCH_INTERVAL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            state = _dir_state(self.directory)
            if state != self._state:
                self._state = state
                self.reload()

    def reload(self) -> bool:
        try:
            policy = load_policy_dir(self.directory)
            if self.policy is not None and policy.fingerprint == self.policy.fingerprint:
                return True
            tables = compile_tables(policy, self.registry.ids, self.answers)
            self.backend.update(tables)
        except (PolicyLoadError, CompileError) as e:
            for d in e.diagnostics:
                print(d, file=sys.stderr)
            self._record_refusal([str(d) for d in e.diagnostics])
            return False
        except Exception as e:      # the backend refused the tables: keep the old ones
            self._record_refusal([f"{type(e).__name__}: {e}"])
            return False
        self.policy, self.tables = policy, tables
        self.registry.absorb(tables)
        self.reloads += 1
        _say(f"policy reloaded: {len(policy.policies)} policies from {self.directory}")
        return True

    def _record_refusal(self, errors: list[str]) -> None:
        _say(f"policy change refused ({len(errors)} error(s)); the previous policy stays in force")
        self.audit.write(AuditRecord(now_ns(), "", "PolicyReload", self.directory, "deny",
                                     backend=getattr(self.backend, "name", ""), reason="; ".join(errors)[:4000]),
                         echo=False)


def _protected_paths(args) -> list[str]:
    """leash's own files: governed processes may not open them."""
    paths = [os.path.abspath(args.policy), os.path.dirname(os.path.abspath(leash.__file__))]
    archive = os.environ.get("SHIV_ENTRY_POINT") and sys.argv[0]
    if archive and os.path.exists(archive):
        paths.append(os.path.abspath(archive))
    if args.audit:
        paths.append(os.path.abspath(args.audit))
    return paths


def _daemon_cgroup(agent: str) -> str:
    """leash-root/AGENT: where operators put an agent's processes."""
    from leash.kernel.cgroup import leash_root
    path = os.path.join(leash_root(), agent)
    os.makedirs(path, exist_ok=True)
    return path


def run(args) -> int:
    """The main job. Returns the exit status."""
    from leash.kernel.backend import BackendUnavailable, select_backend
    from leash.kernel.cgroup import CgroupError

    if os.geteuid() != 0:
        _say("must run as root (it loads BPF programs and answers fanotify events)")
        return EXIT_UNSUPPORTED
    try:
        oom.spare_self()
        oom_note = None
    except OSError as e:               # said once leash runs: a refusal to start stays one line
        oom_note = f"note: the OOM killer may pick leash (lowering oom_score_adj: {e.strerror or e})"
    registry = AgentRegistry()
    command = list(args.command or [])
    agent = args.agent or (os.path.basename(command[0]) if command else None)
    if agent is not None:
        registry.add(agent)
    try:
        audit = AuditLog(args.audit)
    except OSError as e:
        _say(f"cannot open audit file {args.audit}: {e.strerror}")
        return EXIT_BAD_INPUT
    try:
        backend = select_backend(args.backend, protected_paths=_protected_paths(args))
    except BackendUnavailable as e:
        _say(str(e))
        return EXIT_UNSUPPORTED
    keeper = PolicyKeeper(args.policy, registry, backend, audit)
    try:
        keeper.load_initial()
    except (PolicyLoadError, CompileError) as e:
        for d in e.diagnostics:
            print(d, file=sys.stderr)
        _say(f"{len(e.diagnostics)} error(s) in {args.policy}; nothing started")
        return EXIT_BAD_INPUT
    for w in keeper.policy.warnings:
        print(w, file=sys.stderr)

    from leash.runner import AgentRun, resolve_user
    run_as = None
    if getattr(args, "user", None):
        if not command:
            _say("--user applies to -- CMD")
            return EXIT_BAD_INPUT
        try:
            run_as = resolve_user(args.user)
        except ValueError as e:
            _say(str(e))
            return EXIT_BAD_INPUT
    keep_caps = capabilities.AGENT_KEEPS
    if getattr(args, "cap_add", None):
        if not command:
            _say("--cap-add applies to -- CMD")
            return EXIT_BAD_INPUT
        try:
            keep_caps = keep_caps | capabilities.parse(args.cap_add)
        except ValueError as e:
            _say(str(e))
            return EXIT_BAD_INPUT
    child = AgentRun(agent, command, run_as, keep_caps) if command else None
    try:
        if child is not None:
            child.fork()           # before any thread: the child waits, not yet exec'd
        try:
            backend.start(keeper.tables, args.mode, audit.write)
        except ValueError as e:        # the policy does not fit the kernel tables: nothing attached
            _say(f"policy refused by the {getattr(backend, 'name', '?')} backend: {e}")
            return EXIT_BAD_INPUT
        except Exception as e:
            _say(f"cannot start the {getattr(backend, 'name', '?')} backend: {e}")
            return EXIT_UNSUPPORTED
        if oom_note:
            _say(oom_note)
        from leash.mcp.service import ServiceError
        mcp = None
        try:
            mcp = _start_mcp(keeper, backend, registry, audit, args.mode)
            return _serve(args, backend, keeper, registry, child)
        except ServiceError as e:
            _say(str(e))
            return EXIT_UNSUPPORTED
        finally:
            if mcp is not None:
                mcp.stop()
            keeper.stop()
            backend.stop()
    except CgroupError as e:
        _say(str(e))
        return EXIT_UNSUPPORTED
    finally:
        if child is not None:
            child.cleanup()
        audit.close()


def _start_mcp(keeper: PolicyKeeper, backend, registry: AgentRegistry, audit: AuditLog, mode: str):
    """Serve leash.toml's [mcp.servers] to governed agents (docs/mcp.md);
    None when it declares none. Raises ServiceError."""
    config = keeper.policy.config.mcp
    if not config.servers:
        return None
    from leash.mcp.service import McpService

    def agent_of_pid(pid: int) -> str | None:
        names = {agent_id: name for name, agent_id in list(registry.ids.items())}
        return names.get(backend.agent_of_pid(pid))

    service = McpService(config.socket, lambda: keeper.policy, agent_of_pid, audit.write, mode)
    service.start()
    _say(f"serving MCP servers {', '.join(sorted(config.servers))} to agents on {config.socket}")
    return service


def _serve(args, backend, keeper: PolicyKeeper, registry: AgentRegistry, child) -> int:
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        if signum == signal.SIGHUP:
            keeper.request_reload()
            return
        received.append(signum)
        if child is not None:
            child.forward(signum)
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    keeper.start()
    name = getattr(backend, "name", "?")
    if child is not None:
        agent_id = registry.ids[child.agent]
        child.place(agent_id, backend)
        _say(f"governing {child.agent!r} (pid {child.pid}) with the {name} backend, mode {args.mode}")
        child.release()
        return child.wait()
    governed = 0
    for agent, cfg in keeper.policy.config.agents.items():
        path = cfg.cgroup or _daemon_cgroup(agent)
        backend.govern(registry.ids[agent], path)
        _say(f"governing agent {agent!r}: processes in {path}")
        governed += 1
    if not governed:
        _say("no agents declared in leash.toml: nothing to govern (use -- CMD or add [agents.NAME])")
    _say(f"{name} backend running, mode {args.mode}; SIGHUP or a file change reloads {args.policy}")
    while not stop.wait(3600):
        pass
    return 0

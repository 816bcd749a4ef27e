"""`leash mcp wrap` and `leash mcp proxy`.

`add_parser(subparsers)` adds the `mcp` command to an argparse subparsers
object; each leaf sets `func(args) -> int` (the exit status). `python -m
leash.mcp` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from leash.audit import AuditLog
from leash.mcp.reload import PolicySource
from leash.mcp.session import Gateway, Settings
from leash.policy.loader import PolicyLoadError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    mcp = subparsers.add_parser("mcp", help="MCP gateway: Cedar on every tool call",
                                description="Decide every MCP tool call with the Cedar policies in DIR.")
    leaves = mcp.add_subparsers(dest="mcp_command", required=True, metavar="{wrap,proxy}")

    wrap = leaves.add_parser("wrap", help="sit between an MCP client and a stdio server it spawns",
                             description="Spawn CMD and check every message between it and the MCP "
                                         "client on stdin/stdout. For clients outside every agent's "
                                         "scope; a governed agent uses a server the daemon hosts "
                                         "([mcp.servers] in leash.toml) through /run/leash/mcp-relay.")
    _common(wrap)
    wrap.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                      help="the stdio MCP server to run")
    wrap.set_defaults(func=run_wrap)

    proxy = leaves.add_parser("proxy", help="reverse proxy for a Streamable HTTP server",
                              description="Serve the upstream MCP endpoint on LISTEN, checking every message.")
    _common(proxy)
    proxy.add_argument("--listen", required=True, metavar="HOST:PORT",
                       help="address to serve on, e.g. 127.0.0.1:8931 (port 0 picks one and prints it)")
    proxy.add_argument("--upstream", required=True, metavar="URL",
                       help="the server's MCP endpoint, e.g. http://127.0.0.1:8000/mcp")
    proxy.set_defaults(func=run_proxy)
    return mcp


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, metavar="DIR", help="policy directory (*.cedar, leash.toml)")
    p.add_argument("--agent", required=True, metavar="NAME", help="the Cedar principal Agent::\"NAME\"")
    p.add_argument("--server", required=True, metavar="SERVER",
                   help="the Cedar server name: tools are MCP::Tool in MCP::Server::\"SERVER\"")
    p.add_argument("--mode", choices=("enforce", "audit"), default="enforce",
                   help="audit: record what would be refused, refuse nothing (default: enforce)")
    p.add_argument("--audit-log", metavar="PATH",
                   help="append JSON Lines audit records here (denies also go to stderr)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="answer a request the server leaves unanswered this long (progress "
                        "notifications extend it; 0: wait forever; default 300)")
    p.add_argument("--max-message-bytes", type=_positive, default=16 << 20, metavar="N",
                   help="largest JSON-RPC message accepted from either side (default 16 MiB)")
    p.add_argument("--allow-method", action="append", default=[], metavar="METHOD",
                   help="let an extension method through (repeatable)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1024:
        raise argparse.ArgumentTypeError("must be at least 1024")
    return value


def _gateway(args: argparse.Namespace, transport: str,
             client_pid: int = 0) -> tuple[Gateway, PolicySource, AuditLog]:
    """Raises PolicyLoadError (the policy) or OSError (the audit log)."""
    log = AuditLog(args.audit_log)
    try:
        source = PolicySource(args.policy, log.write, args.agent, args.mode)
    except PolicyLoadError:
        log.close()
        raise
    settings = Settings(agent=args.agent, server=args.server, transport=transport, mode=args.mode,
                        timeout_s=max(0.0, args.timeout), max_message_bytes=args.max_message_bytes,
                        extra_methods=frozenset(args.allow_method), client_pid=client_pid)
    return Gateway(settings, source.current, log.write), source, log


def run_wrap(args: argparse.Namespace) -> int:
    from leash.mcp.stdio import client_pid, wrap
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("leash mcp wrap: give the server command after -- (an agent reaches a server the leash "
              "daemon hosts through the daemon's relay instead: /run/leash/mcp-relay SERVER; docs/mcp.md)",
              file=sys.stderr)
        return 2
    return _run_gateway(args, "stdio", lambda gateway, reload: wrap(gateway, command, reload), client_pid())


def run_proxy(args: argparse.Namespace) -> int:
    from leash.mcp.http import ProxyConfig, UpstreamURLError, serve
    try:
        host, port = _host_port(args.listen)
        config = ProxyConfig.create(host, port, args.upstream)
    except (ValueError, UpstreamURLError) as e:
        print(f"leash mcp proxy: {e}", file=sys.stderr)
        return 2
    return _run_gateway(args, "http", lambda gateway, reload: serve(gateway, config, reload))


def _run_gateway(args: argparse.Namespace, transport: str, main, client_pid: int = 0) -> int:
    """Load the policy and open the audit log (2 with the reason if either
    fails), then run main(gateway, request_reload) to the end."""
    try:
        gateway, source, log = _gateway(args, transport, client_pid)
    except PolicyLoadError as e:
        print(f"leash: policy {args.policy} does not load:\n{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"leash: cannot open the audit log {args.audit_log}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main(gateway, source.request_reload))
    finally:
        log.close()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leash.mcp")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mcp", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)

"""Command line. `leash --policy DIR [-- CMD ...]` runs the enforcer (the main
job); the subcommands check, explain, doctor, demo and mcp are tools around it.

Exit codes: 0 success; 2 bad input (policy errors, bad arguments); 1 the
host cannot do what was asked (no usable backend); a governed command's own
status when running one.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

EXIT_BAD_INPUT = 2
EXIT_UNSUPPORTED = 1
SUBCOMMANDS = ("check", "explain", "doctor", "demo", "mcp", "run")


def _load(directory: str):
    """(policy, tables) or exit 2 with every error on stderr."""
    from leash.policy.compiler import CompileError, compile_tables
    from leash.policy.loader import PolicyLoadError, load_policy_dir
    try:
        policy = load_policy_dir(directory)
        tables = compile_tables(policy)
    except (PolicyLoadError, CompileError) as e:
        for d in e.diagnostics:
            print(d, file=sys.stderr)
        print(f"leash: {len(e.diagnostics)} error(s) in {directory}; nothing loaded",
              file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    return policy, tables


def cmd_check(args) -> int:
    from leash.check import human, summarize
    policy, tables = _load(args.policy)
    summary = summarize(policy, tables)
    if args.json:
        sys.stdout.write(msgspec.json.encode(summary).decode() + "\n")
    else:
        print(human(summary))
    return 0


def cmd_explain(args) -> int:
    from leash.explain import ExplainError, ExplainRequest, explain, human
    from leash.policy.tables import TableIndex
    _, tables = _load(args.policy)
    index = TableIndex(tables)
    if args.batch:
        return _explain_batch(index)
    missing = [f"--{n}" for n in ("agent", "action", "resource") if getattr(args, n) is None]
    if missing:
        print(f"leash explain: {', '.join(missing)} required (or --batch)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = explain(index, ExplainRequest(args.agent, args.action, args.resource, args.protocol),
                         with_details=True)
    except ExplainError as e:
        print(f"leash explain: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        print(human(result))
    return 0


def _explain_batch(index) -> int:
    """JSON Lines in, JSON Lines out, one answer per request line, in order."""
    from leash.explain import ExplainError, ExplainRequest, explain
    decoder = msgspec.json.Decoder(ExplainRequest)
    encoder = msgspec.json.Encoder()
    out = sys.stdout.buffer
    bad = 0
    for lineno, line in enumerate(sys.stdin.buffer, 1):
        if not line.strip():
            continue
        try:
            result = explain(index, decoder.decode(line))
            out.write(encoder.encode(result) + b"\n")
        except (msgspec.DecodeError, ExplainError) as e:
            bad += 1
            out.write(encoder.encode({"line": lineno, "error": str(e)}) + b"\n")
    out.flush()
    return EXIT_BAD_INPUT if bad else 0


def cmd_doctor(args) -> int:
    from leash.doctor import human, run_probes
    report = run_probes()
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print(human(report))
    return 0 if report.usable_backend else EXIT_UNSUPPORTED


def cmd_run(args) -> int:
    from leash.daemon import run
    if args.policy is None:
        print("leash: --policy DIR is required", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(args)


def cmd_demo(args) -> int:
    from leash.demo import run_demo
    return run_demo(args)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="DIR", help="directory of *.cedar files (and leash.toml)")
    p.add_argument("--agent", metavar="NAME", help="agent name for -- CMD (default: the command's name)")
    p.add_argument("--mode", choices=("enforce", "audit"), default="enforce",
                   help="audit: record what would be refused, refuse nothing")
    p.add_argument("--backend", choices=("lsm", "compat"), help="force a kernel backend")
    p.add_argument("--audit", metavar="FILE", help="append audit records (JSON Lines) to FILE")
    p.add_argument("--user", metavar="USER", help="run -- CMD as this user (name or uid) instead of root")
    p.add_argument("--cap-add", metavar="CAP", action="append", default=[],
                   help="let -- CMD keep this capability (e.g. NET_ADMIN); by default it keeps only "
                        "what container runtimes give root, less NET_RAW, MKNOD and SYS_CHROOT")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS: run CMD as a governed agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leash", description="Runtime policy enforcement for AI agents: Cedar policies, "
                                  "enforced in the kernel.",
        epilog="Without a subcommand: leash --policy DIR [--agent NAME] [-- CMD ARGS]")
    sub = parser.add_subparsers(dest="subcommand")

    run = sub.add_parser("run", help="enforce (the default when no subcommand is given)")
    _run_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate and compile a policy directory")
    check.add_argument("--policy", metavar="DIR", required=True)
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_check)

    ex = sub.add_parser("explain", help="the decision for one event, from the compiled tables")
    ex.add_argument("--policy", metavar="DIR", required=True)
    ex.add_argument("--agent")
    ex.add_argument("--action", help="FileOpenReadOnly | FileOpenReadWrite | ProcessExec | NetworkConnect")
    ex.add_argument("--resource", help="/path, /dir/, host:port, ip:port or [ipv6]:port")
    ex.add_argument("--protocol", default="tcp", choices=("tcp", "udp"))
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--batch", action="store_true",
                    help="read JSON Lines requests on stdin, write one JSON answer per line")
    ex.set_defaults(func=cmd_explain)

    doc = sub.add_parser("doctor", help="what this host supports, per backend")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="run a short demo agent under the built-in default policy")
    demo.add_argument("--backend", choices=("lsm", "compat"))
    demo.add_argument("--audit", metavar="FILE")
    demo.set_defaults(func=cmd_demo)

    try:
        from leash.mcp.cli import add_parser as add_mcp
    except ImportError:
        add_mcp = None
    if add_mcp is not None:
        add_mcp(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv = ["run"] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

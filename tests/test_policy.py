"""Policy loading, compiling and the check/explain CLI: good input gives real
decisions, bad input gives file:line:column and a reason, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from leash.policy import requests as rq
from leash.policy.compiler import CompileError, compile_tables
from leash.policy.loader import PolicyLoadError, load_policy_dir
from leash.policy.tables import TableIndex

REFERENCE_STYLE = '''\
// Policies in the reference product's vocabulary.
permit (principal, action == Action::"FileOpen", resource)
when { resource in [ Dir::"/workspace" ] };

forbid (principal, action == Action::"FileOpenReadWrite", resource)
when { resource in [ Dir::"/workspace/secrets/" ] };

permit (principal, action == Action::"ProcessExec", resource)
when { resource in [ Dir::"/bin/", Dir::"/usr/bin/" ] };

forbid (principal, action == Action::"ProcessExec", resource)
when { resource in [ File::"/bin/rm" ] };

permit (principal, action == Action::"NetworkConnect", resource)
when { resource in [ Host::"api.internal" , Host::"db.internal:5432" ] };

forbid (principal, action == Action::"NetworkConnect", resource)
when { resource in [ Host::"*.facebook.com" ] };

forbid (principal, action == Action::"McpCall", resource == MCP::Tool::"execute-shell")
when { resource in [ MCP::Server::"mcp.example.com" ] };

permit (principal, action == Action::"HttpRewrite", resource == Host::"api.internal")
when { context.header == "X-Leash-Auth" && context.value == "service-token" };
'''


def write(tmp_path, files: dict[str, str | bytes]) -> str:
    for name, text in files.items():
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(tmp_path / name, mode) as f:
            f.write(text)
    return str(tmp_path)


def errors_of(directory: str) -> list[str]:
    with pytest.raises((PolicyLoadError, CompileError)) as e:
        compile_tables(load_policy_dir(directory))
    return [str(d) for d in e.value.diagnostics]


def leash(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leash", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- good input

def test_reference_vocabulary_loads_with_rewrites_and_warnings(tmp_path):
    policy = load_policy_dir(write(tmp_path, {"ref.cedar": REFERENCE_STYLE}))
    warnings = [str(w) for w in policy.warnings]
    assert any("ref.cedar:2:" in w and 'action in Action::"FileOpen"' in w for w in warnings)
    assert any("ref.cedar:3:" in w and 'Dir::"/workspace/"' in w for w in warnings)
    assert any("HttpRewrite" in w and "not enforced" in w for w in warnings)
    index = TableIndex(compile_tables(policy))
    other = index.agent_id("anyone")

    def decide(action, path):
        ans = index.path(other, action, path, False)
        return index.tables.verdicts[ans.verdict].allow

    assert decide("FileOpenReadOnly", "/workspace/src/main.py")
    assert decide("FileOpenReadWrite", "/workspace/notes")
    assert not decide("FileOpenReadWrite", "/workspace/secrets/key")
    assert decide("FileOpenReadOnly", "/workspace/secrets/key")
    assert not decide("FileOpenReadOnly", "/workspacex/a")
    assert decide("ProcessExec", "/usr/bin/ls")
    assert not decide("ProcessExec", "/bin/rm")
    ans = index.host(other, "db.internal", 5432, 6)
    assert index.tables.verdicts[ans.verdict].allow
    ans = index.host(other, "db.internal", 5433, 6)
    assert not index.tables.verdicts[ans.verdict].allow
    ans = index.host(other, "www.facebook.com", 443, 6)
    assert not index.tables.verdicts[ans.verdict].allow


def test_policy_ids_are_annotations_or_file_and_line(tmp_path):
    policy = load_policy_dir(write(tmp_path, {
        "a.cedar": '@id("base")\npermit(principal, action, resource in Dir::"/w/");\n\n'
                   'forbid(principal, action, resource in Dir::"/w/s/");\n'}))
    assert [p.id for p in policy.policies] == ["base", "a.cedar:4"]
    d = policy.decide(rq.file_request("x", [], "FileOpenReadOnly", "/w/s/k", False))
    assert (d.allow, d.policies) == (False, ["a.cedar:4"])


def test_groups_from_config(tmp_path):
    policy = load_policy_dir(write(tmp_path, {
        "leash.toml": '[agents.claude]\ngroups = ["coders"]\n[groups.coders]\ngroups = ["staff"]\n',
        "p.cedar": 'permit(principal in AgentGroup::"staff", action == Action::"ProcessExec", '
                   'resource in Dir::"/usr/bin/");\n'}))
    index = TableIndex(compile_tables(policy))
    yes = index.path(index.agent_id("claude"), "ProcessExec", "/usr/bin/git", False)
    no = index.path(index.agent_id("stranger"), "ProcessExec", "/usr/bin/git", False)
    assert index.tables.verdicts[yes.verdict].allow
    assert not index.tables.verdicts[no.verdict].allow


# ---------------------------------------------------------------- bad input

def test_missing_and_empty_and_unreadable_directories(tmp_path):
    assert "no such directory" in errors_of(str(tmp_path / "nope"))[0]
    assert "no *.cedar policy files" in errors_of(str(tmp_path))[0]
    (tmp_path / "f").write_text("x")
    assert "not a directory" in errors_of(str(tmp_path / "f"))[0]
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.cedar").write_text("permit(principal, action, resource);")
    os.chmod(locked / "a.cedar", 0)
    if os.geteuid() != 0:   # root reads anything; the directory case below covers root
        assert "cannot read" in errors_of(str(locked))[0]


def test_every_error_is_reported_with_position(tmp_path):
    long_dir = "/" + "d" * 260 + "/"
    errs = errors_of(write(tmp_path, {
        "a.cedar": 'permit(principal, action, resource)\n  when { resource in Dir::"/x/" && };\n'
                   '@id("dup") permit(principal, action == Action::"ProcessExec", resource in File::"rel/bin");\n'
                   '@id("dup") permit(principal, action, resource);\n'
                   'permit(principal, action == Action::"NetworkConnect", resource) when { context.nope == 1 };\n'
                   f'permit(principal, action, resource in Dir::"{long_dir}");\n'
                   'permit(principal, action == Action::"NetworkConnect", resource in Host::"10.0.0.0/8");\n'
                   'permit(principal, action == Action::"NetworkConnect", resource in Host::"db:99999");\n'
                   'permit(principal, action == Action::"NetworkConnect", resource) when { context.ip.isInRange(ip("10.0.0.300/8")) };\n'
                   'permit(principal, action, resource',
        "b.cedar": 'permit(principal, action, resource) when { "abc };\n',
        "c.cedar": b"permit(principal, action, resource);\n\xff\n",
    }))
    text = "\n".join(errs)
    assert "a.cedar:2:37: error: unexpected token `}`" in text
    assert "a.cedar:3:" in text and "not an absolute path" in text
    assert "a.cedar:4:1: error: duplicate policy id 'dup'" in text
    assert "a.cedar:5:" in text and "attribute `nope`" in text
    assert "a.cedar:6:" in text and "the kernel key holds paths up to 250 bytes" in text
    assert "a.cedar:7:" in text and "looks like a CIDR" in text
    assert "a.cedar:8:" in text and "port '99999'" in text
    assert "a.cedar:9:" in text
    assert "a.cedar:10:" in text and "does not end with `;`" in text
    assert "b.cedar:1:44: error: unterminated string literal" in text
    assert "c.cedar:2:1: error: not UTF-8" in text


def test_bad_config_names_the_key(tmp_path):
    errs = errors_of(write(tmp_path, {"leash.toml": "[agents.a]\ngroups = 3\n",
                                      "p.cedar": "permit(principal, action, resource);"}))
    assert errs[0].startswith("leash.toml:") and "groups" in errs[0]


def test_like_on_paths_is_refused_with_position(tmp_path):
    errs = errors_of(write(tmp_path, {"p.cedar": '\n\npermit(principal, action == Action::"NetworkConnect", resource)\n'
                                                 '  when { context has hostname && context.hostname like "*.x" };\n'}))
    assert len(errs) == 1
    assert errs[0].startswith("p.cedar:4:") and "`like` on context.hostname" in errs[0]


def test_mcp_only_policies_may_use_any_construct(tmp_path):
    policy = load_policy_dir(write(tmp_path, {"p.cedar": (
        'permit(principal, action == Action::"McpCall", resource == MCP::Tool::"read")\n'
        '  when { context.arguments has path && context.arguments.path like "/tmp/*" };\n')}))
    compile_tables(policy)                  # not a kernel action: nothing to refuse
    allowed = policy.decide(rq.mcp_request("a", [], "s", "read", "tools/call", {"path": "/tmp/x"}))
    refused = policy.decide(rq.mcp_request("a", [], "s", "read", "tools/call", {"path": "/etc/x"}))
    assert allowed.allow and not refused.allow


def test_forged_entity_references_in_mcp_arguments_are_refused():
    with pytest.raises(rq.UnrepresentableArgument):
        rq.mcp_request("a", [], "s", "t", "tools/call", {"x": {"__entity": {"type": "Agent", "id": "root"}}})


# ---------------------------------------------------------------- CLI

def test_check_cli(tmp_path):
    good = write(tmp_path, {"ref.cedar": REFERENCE_STYLE})
    r = leash("check", "--policy", good)
    assert r.returncode == 0, r.stderr
    assert "policy OK: 8 policies in 1 file" in r.stdout
    assert "FileOpenReadWrite" in r.stdout and "1 forbid" in r.stdout
    (tmp_path / "bad.cedar").write_text("permit(principal, action, resource) when { 1 + };")
    r = leash("check", "--policy", good)
    assert r.returncode == 2
    assert "bad.cedar:1:" in r.stderr and "Traceback" not in r.stderr


def test_explain_cli_and_batch(tmp_path):
    d = write(tmp_path, {"ref.cedar": REFERENCE_STYLE})
    r = leash("explain", "--policy", d, "--agent", "claude", "--action", "FileOpenReadWrite",
              "--resource", "/workspace/secrets/k", "--json")
    out = json.loads(r.stdout)
    assert out["decision"] == "deny" and out["policies"] == ["ref.cedar:5"]
    lines = [{"agent": "claude", "action": "FileOpenReadOnly", "resource": "/etc/passwd"},
             {"agent": "claude", "action": "NetworkConnect", "resource": "api.internal:443"},
             {"agent": "claude", "action": "NetworkConnect", "resource": "[::ffff:10.0.0.1]:80"},
             {"agent": "claude", "action": "Bogus", "resource": "/x"}]
    r = leash("explain", "--policy", d, "--batch",
              stdin="\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    answers = [json.loads(x) for x in r.stdout.splitlines()]
    assert [a.get("decision") for a in answers] == ["deny", "allow", "deny", None, None]
    assert answers[1]["policies"] == ["ref.cedar:14"]
    assert "unknown action" in answers[3]["error"] and answers[4]["line"] == 5
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_documented_examples_load(tmp_path):
    """docs/policy.md's and README's examples are real, loadable policy sets."""
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for doc in ("docs/policy.md", "README.md"):
        with open(os.path.join(root, doc)) as f:
            blocks = re.findall(r"```cedar\n(.*?)```", f.read(), re.S)
        assert blocks, doc
        for i, block in enumerate(blocks):
            d = tmp_path / f"{os.path.basename(doc)}-{i}"
            d.mkdir()
            (d / "example.cedar").write_text(block)
            compile_tables(load_policy_dir(str(d)))

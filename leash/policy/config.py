"""DIR/leash.toml: which agents exist, their groups, and gateway settings.

    [agents.claude]
    groups = ["coders"]
    cgroup = "/sys/fs/cgroup/agents/claude"   # daemon mode: processes in this
                                              # cgroup subtree are this agent

    [groups.coders]
    groups = ["everyone"]                     # groups may belong to groups

    [mcp]
    record_arguments = false                  # true, or a list of argument names
    socket = "/run/leash/mcp.sock"            # where the daemon serves [mcp.servers]

    [mcp.servers.files]                       # a stdio MCP server the daemon starts
    command = ["/usr/local/bin/mcp-files", "--root", "/srv"]   # for a governed agent
    env = { LOG_LEVEL = "info" }              # optional: added to a minimal environment
    cwd = "/srv"                              # optional: working directory
    user = "mcp"                              # optional: run as this user (name or uid);
                                              # default: the daemon's user (root)
"""

from __future__ import annotations

import re
import sys

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_FILE = "leash.toml"
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    groups: list[str] = []
    cgroup: str | None = None


class GroupConfig(msgspec.Struct, forbid_unknown_fields=True):
    groups: list[str] = []


class McpServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    command: list[str]
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | int | None = None


class McpConfig(msgspec.Struct, forbid_unknown_fields=True):
    record_arguments: bool | list[str] = False
    socket: str = "/run/leash/mcp.sock"
    servers: dict[str, McpServerConfig] = {}


class Config(msgspec.Struct, forbid_unknown_fields=True):
    agents: dict[str, AgentConfig] = {}
    groups: dict[str, GroupConfig] = {}
    mcp: McpConfig = msgspec.field(default_factory=McpConfig)

    def ancestor_groups(self, agent: str) -> list[str]:
        """Every group the agent is in, directly or through other groups."""
        seen: list[str] = []
        todo = list(self.agents[agent].groups) if agent in self.agents else []
        while todo:
            g = todo.pop(0)
            if g not in seen:
                seen.append(g)
                todo.extend(self.groups.get(g, GroupConfig()).groups)
        return seen


class ConfigError(Exception):
    pass


def parse_config(text: str) -> Config:
    """Raises ConfigError with a message that names the offending key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(e)) from None
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_server_error(raw) or str(e)) from None
    for kind, names in (("agent", config.agents), ("group", config.groups)):
        for name in names:
            if not _NAME.match(name):
                raise ConfigError(f"{kind} name {name!r} must be 1-64 characters of letters, digits, _ . @ + -")
    for name, agent in config.agents.items():
        for g in agent.groups:
            if not _NAME.match(g):
                raise ConfigError(f"agent {name!r}: group name {g!r} is not valid")
        if agent.cgroup is not None and not agent.cgroup.startswith("/"):
            raise ConfigError(f"agent {name!r}: cgroup must be an absolute path, got {agent.cgroup!r}")
    _check_mcp(config.mcp)
    return config


def _server_error(raw: dict) -> str | None:
    """msgspec says `$.mcp.servers[...]` for an error inside a server's
    table; this names the server."""
    servers = raw.get("mcp", {}).get("servers") if isinstance(raw.get("mcp"), dict) else None
    if not isinstance(servers, dict):
        return None
    for name, table in servers.items():
        try:
            msgspec.convert(table, McpServerConfig)
        except msgspec.ValidationError as e:
            where = f"$.mcp.servers.{name}"
            text = str(e)
            return text.replace("`$", f"`{where}") if " - at `$" in text else f"{text} - at `{where}`"
    return None


def _check_mcp(mcp: McpConfig) -> None:
    if not mcp.socket.startswith("/") or "\0" in mcp.socket:
        raise ConfigError(f"mcp.socket must be an absolute path, got {mcp.socket!r}")
    for name, server in mcp.servers.items():
        key = f"mcp.servers.{name}"
        if not _NAME.match(name):
            raise ConfigError(f"{key}: server name {name!r} must be 1-64 characters of letters, digits, _ . @ + -")
        if not server.command:
            raise ConfigError(f"{key}.command is empty: give the server's program and its arguments")
        if not server.command[0].startswith("/"):
            raise ConfigError(f"{key}.command: the program must be an absolute path, got {server.command[0]!r}")
        if any("\0" in arg for arg in server.command):
            raise ConfigError(f"{key}.command: an argument contains a NUL character")
        for var, value in server.env.items():
            if not var or "=" in var or "\0" in var or "\0" in value:
                raise ConfigError(f"{key}.env: {var!r} is not a valid environment variable")
        if server.cwd is not None and not server.cwd.startswith("/"):
            raise ConfigError(f"{key}.cwd must be an absolute path, got {server.cwd!r}")
        if isinstance(server.user, int) and server.user < 0 or server.user == "":
            raise ConfigError(f"{key}.user must be a user name or a uid, got {server.user!r}")

"""DIR/leash.toml: which agents exist, their groups, and gateway settings.

    [agents.claude]
    groups = ["coders"]
    cgroup = "/sys/fs/cgroup/agents/claude"   # daemon mode: processes in this
                                              # cgroup subtree are this agent

    [groups.coders]
    groups = ["everyone"]                     # groups may belong to groups

    [mcp]
    record_arguments = false                  # true, or a list of argument names
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


class McpConfig(msgspec.Struct, forbid_unknown_fields=True):
    record_arguments: bool | list[str] = False


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
        raise ConfigError(str(e)) from None
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
    return config

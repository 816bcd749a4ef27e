"""The MCP methods the gateway lets through, per direction (protocol
revisions 2024-11-05 to 2026-07-28). A method outside these sets is refused in
enforce mode: a server that routes methods loosely (say, case-insensitively)
must not be reachable under a name the gateway does not recognise as a tool
call. `--allow-method` adds extension methods."""

CLIENT_REQUESTS = frozenset({
    "initialize", "ping", "server/discover",
    "tools/list", "tools/call",
    "resources/list", "resources/templates/list", "resources/read",
    "resources/subscribe", "resources/unsubscribe",
    "prompts/list", "prompts/get",
    "completion/complete", "logging/setLevel", "subscriptions/listen",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
})

CLIENT_NOTIFICATIONS = frozenset({
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "notifications/tasks/status",
})

SERVER_REQUESTS = frozenset({
    "ping", "sampling/createMessage", "elicitation/create", "roots/list",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
})

SERVER_NOTIFICATIONS = frozenset({
    "notifications/cancelled", "notifications/progress", "notifications/message",
    "notifications/resources/updated", "notifications/resources/list_changed",
    "notifications/tools/list_changed", "notifications/prompts/list_changed",
    "notifications/elicitation/complete", "notifications/subscriptions/acknowledged",
    "notifications/tasks/status",
})

TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"
CANCELLED = "notifications/cancelled"
PROGRESS = "notifications/progress"

"""An MCP server built with the official SDK, for the gateway's tests and
benchmark: `python server_app.py` serves stdio, `python server_app.py http
PORT json|sse` serves Streamable HTTP on 127.0.0.1:PORT/mcp."""

import sys

from mcp.server.mcpserver import Context, MCPServer

app = MCPServer("files")


@app.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


@app.tool()
def read_file(path: str) -> str:
    """Pretend to read a file."""
    return f"contents of {path}"


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def delete_file(path: str) -> str:
    """Pretend to delete a file."""
    return f"deleted {path}"


@app.tool()
def write_file(path: str, text: str) -> str:
    """Pretend to write a file."""
    return f"wrote {len(text)} bytes to {path}"


@app.tool()
async def count(n: int, ctx: Context) -> str:
    """Report progress n times, then answer."""
    for i in range(n):
        await ctx.report_progress(i + 1, n)
    return f"counted to {n}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]),
                json_response=sys.argv[3] == "json")
    else:
        app.run()
